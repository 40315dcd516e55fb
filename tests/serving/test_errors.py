"""Every error of the agent API reads as OpenAI's do: the official ``openai`` client raises the exception class of the
status, carrying our message, and the body is ``{"error": {"message", "type", "param", "code"}}``. Bad questions,
requests that do not validate and unknown routes are sent to the served process; body limits, busy answers, page
errors and unexpected failures to an in-process app with small limits and no policy (uvicorn on 127.0.0.1)."""

import httpx
import openai
import pytest
from asgi_thread import request_in_flight, serve_app

from vrag_rl.http_guard import RequestLimits
from vrag_rl.retrieval.base import PageCatalog
from vrag_rl.serving.app import create_app

BODY = 4000  # the small app's body limit, in bytes


def check_error(err: openai.APIStatusError, kind: type, status: int, says: str, param: str | None = None) -> None:
    assert type(err) is kind and err.status_code == status
    error_type = "invalid_request_error" if status < 500 else "server_error"
    assert err.body == {"message": err.body["message"], "type": error_type, "param": param, "code": status}
    assert says in err.body["message"] and err.message == f"Error code: {status} - {err.body['message']}"
    assert err.code == str(status) and err.type == error_type and err.param == param


def ask(client: openai.OpenAI, content, **kw):
    return client.chat.completions.create(model="m", messages=[{"role": "user", "content": content}], **kw)


def image_question(url: str | None) -> list[dict]:
    return [{"type": "text", "text": "q"}, {"type": "image_url", "image_url": {"url": url}}]


@pytest.fixture(scope="module")
def served(agent_server):
    with openai.OpenAI(base_url=agent_server.url + "/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


BAD_QUESTIONS = {
    "no user message": ([{"role": "system", "content": "hi"}], "no user message"),
    "no text": ([{"role": "user", "content": ""}], "the question has no text"),
    "too long": ([{"role": "user", "content": "why? " * 1000}], "the limit is 4000"),
    "image by URL": ([{"role": "user", "content": image_question("http://x/a.png")}], "inline data: URLs"),
    "not an image": ([{"role": "user", "content": image_question("data:image/png;base64,AAAA")}], "not a decodable"),
    "text not a string": ([{"role": "user", "content": [{"type": "text", "text": 5}]}], "content[0].text must be"),
    "url null": ([{"role": "user", "content": image_question(None)}], "content[1].image_url must be"),
    # The older form, the URL as a string, is taken: this one reaches the decoder.
    "image URL as a string": (
        [
            {
                "role": "user",
                "content": [{"type": "text", "text": "q"}, {"type": "image_url", "image_url": "data:,AAAA"}],
            }
        ],
        "not a decodable",
    ),
}


@pytest.mark.parametrize("messages, says", BAD_QUESTIONS.values(), ids=BAD_QUESTIONS)
def test_questions_the_agent_cannot_take_are_openai_400s(served, messages, says):
    with pytest.raises(openai.APIStatusError) as err:
        served.chat.completions.create(model="m", messages=messages)
    param = err.value.body.get("param") if isinstance(err.value.body, dict) else None
    check_error(err.value, openai.BadRequestError, 400, says, param)
    assert param is None or param in err.value.body["message"]  # a malformed part is named


def test_requests_that_do_not_validate_are_openai_422s_naming_the_field(served):
    with pytest.raises(openai.APIStatusError) as err:
        served.chat.completions.create(model="m", messages="hi")
    check_error(err.value, openai.UnprocessableEntityError, 422, "messages: Input should be a valid list", "messages")
    with pytest.raises(openai.APIStatusError) as err:
        served.post("/chat/completions", body={"model": "m"}, cast_to=object)
    check_error(err.value, openai.UnprocessableEntityError, 422, "messages: Field required", "messages")


def test_unknown_routes_and_methods_are_openai_404_and_405(served):
    with pytest.raises(openai.APIStatusError) as err:
        served.models.retrieve("no-such-model")
    check_error(err.value, openai.NotFoundError, 404, "Not Found: GET /v1/models/no-such-model")
    with pytest.raises(openai.APIStatusError) as err:
        served.get("/chat/completions", cast_to=object)
    check_error(err.value, openai.APIStatusError, 405, "Method Not Allowed: GET /v1/chat/completions")


class Catalog(PageCatalog):
    """The bundled corpus, with one page whose lookup fails in a way nobody planned for."""

    def page_path(self, page_id: str):
        if page_id == "doc0000_1":
            raise RuntimeError("/srv/secret/path: an internal failure")
        return super().page_path(page_id)


@pytest.fixture(scope="module")
def small(bundled_corpus):
    """(base URL, client) of an agent app with no policy, a 4000-byte body limit and one request at a time."""
    limits = RequestLimits(max_body_bytes=BODY, max_in_flight=1)
    app = create_app(None, Catalog(bundled_corpus), {}, "vrag-agent", lambda: "no policy in this test", limits=limits)
    with serve_app(app) as url, openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30) as c:
        yield url, c


PAGE_ERRORS = {
    "bad box": ("/pages/doc0001_1?box=5,5,1,1", openai.BadRequestError, 400, "box must be x1,y1,x2,y2"),
    "path as id": ("/pages/.hidden", openai.BadRequestError, 400, "malformed page id '.hidden'"),
    "no page": ("/pages/nope_1", openai.NotFoundError, 404, "no page 'nope_1' in the corpus"),
    "no file": ("/static/x.js", openai.NotFoundError, 404, "no file 'x.js'"),
    "unexpected": ("/pages/doc0000_1", openai.InternalServerError, 500, "internal server error"),
}


@pytest.mark.parametrize("path, kind, status, says", PAGE_ERRORS.values(), ids=PAGE_ERRORS)
def test_pages_and_files_refuse_with_openai_errors(small, path, kind, status, says):
    url, client = small
    with pytest.raises(openai.APIStatusError) as err:
        client.get(url + path, cast_to=object)
    check_error(err.value, kind, status, says)
    assert "secret" not in err.value.response.text  # an unexpected exception's text stays in the server's log


def test_not_ready_is_an_openai_503(small):
    with pytest.raises(openai.APIStatusError) as err:
        ask(small[1], "a question")
    check_error(err.value, openai.InternalServerError, 503, "no policy in this test")


def test_a_body_over_the_limit_is_an_openai_413(small):
    with pytest.raises(openai.APIStatusError) as err:
        ask(small[1], "x" * BODY)
    check_error(err.value, openai.APIStatusError, 413, f"request body over {BODY} bytes")


def test_a_body_over_the_limit_while_streaming_is_an_openai_413(small):
    url, _ = small

    def chunks():  # no content-length: the limit holds while the body streams in
        for _ in range(5):
            yield b" " * 1000
        yield b'{"messages": []}'

    reply = httpx.post(url + "/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    message = f"request body over {BODY} bytes"
    assert reply.status_code == 413
    assert reply.json() == {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": 413}}


def test_past_the_in_flight_limit_a_request_gets_503_with_retry_after(small):
    url, client = small
    with request_in_flight(url, "/v1/chat/completions"), pytest.raises(openai.InternalServerError) as err:
        ask(client, "a question")
    check_error(err.value, openai.InternalServerError, 503, "busy: 1 requests in flight; retry shortly")
    assert err.value.response.headers["retry-after"] == "1"

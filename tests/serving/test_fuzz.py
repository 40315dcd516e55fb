"""The served agent fuzzed: schemathesis, from the agent API's OpenAPI document, against the ``python -m
vrag_rl.serve`` process on 127.0.0.1 (the warm tiny policy on vLLM): valid and invalid requests to every operation,
bounded in count and time (``tests/fuzz_api.py``)."""

from fuzz_api import fuzz, openai_shape


def test_fuzzed_requests_get_no_server_error_and_errors_in_openai_shape(agent_server):
    """No 5xx but 503, no reply later than 60 s, every error OpenAI's ``{"error": {...}}``, and the server's
    memory within 300 MB of where it began."""
    fuzzed = fuzz(agent_server.url, agent_server.proc.pid, openai_shape, per_operation=100, timeout_s=60, limit_s=100)
    print(f"agent API fuzzed: {fuzzed}")
    assert fuzzed.failures == [], fuzzed.failures[:10]
    assert fuzzed.tried >= 500 and fuzzed.peak_growth < 300_000_000, fuzzed

"""The reward actor on Ray: typed results equal to the plain scorer's, and it comes back after being killed."""

import ray

from vrag_rl.reward.actor import RewardScorer, start_reward_actor
from vrag_rl.reward.score import RewardConfig, RewardInput

INPUTS = [
    RewardInput("q?", "Lyon", "Lyon", ["a_1", "b_2"], ["b_2"], 1, 3, 1),
    RewardInput("q?", ["324 m", "1083 ft"], None, [], ["c_1"], 0, 2, 2),
]


def test_the_reward_actor_scores_like_the_plain_class_and_survives_a_kill(ray_session):
    scorer = start_reward_actor(RewardConfig(), None, num_cpus=0.1)
    try:
        want = RewardScorer(RewardConfig()).score(INPUTS)
        assert scorer.score(INPUTS) == want
        pending = scorer.handle.score.remote(INPUTS)  # in flight when the actor dies: sent again after restart
        ray.kill(scorer.handle, no_restart=False)
        assert ray.get(pending, timeout=120) == want
        assert scorer.score(INPUTS) == want
    finally:
        scorer.shutdown()

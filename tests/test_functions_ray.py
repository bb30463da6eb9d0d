"""The Ray backend asks Ray for the resources it is given, and says so when they cannot be had."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def echo_reference(train_task) -> str:
    import iris_functions
    from metaflow import JsonFunction

    yield JsonFunction(iris_functions.echo, task=train_task).reference
    import ray

    ray.shutdown()


def test_ray_actors_hold_the_resources_asked_for(echo_reference: str) -> None:
    from metaflow import function_from_json

    with function_from_json(echo_reference, backend="ray", replicas=2, num_cpus=0.5) as fn:
        assert [d["resources"] for d in fn.backend.descriptions] == [{"CPU": 0.5}, {"CPU": 0.5}]
        assert fn({"a": 1}) == {"a": 1}


def test_actors_that_cannot_be_placed_give_a_clear_error(echo_reference: str) -> None:
    from metaflow import function_from_json

    from metaflow_stack.functions.errors import FunctionError

    with pytest.raises(FunctionError, match="Ray could not start 1 actor"):
        function_from_json(echo_reference, backend="ray", num_cpus=64, start_timeout=5)

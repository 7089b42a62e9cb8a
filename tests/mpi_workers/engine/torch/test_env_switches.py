import pytest

from mpi_workers.engine.torch.env_switches import env_flag


@pytest.mark.parametrize(
    ("value", "default", "expected"),
    [(None, True, True), ("", True, True), ("", False, False), ("0", True, False),
     ("false", True, False), (" No ", True, False), ("1", False, True), ("yes", False, True)],
)  # fmt: skip
def test_env_flag(monkeypatch, value, default, expected) -> None:
    if value is None:
        monkeypatch.delenv("HPCSERVE_TEST_FLAG", raising=False)
    else:
        monkeypatch.setenv("HPCSERVE_TEST_FLAG", value)
    assert env_flag("HPCSERVE_TEST_FLAG", default) is expected

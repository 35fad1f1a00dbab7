"""The extras declare what each way of using the package imports (the installed metadata)."""

from __future__ import annotations

from importlib.metadata import requires

from packaging.requirements import Requirement


def extra_requirements(extra: str) -> set[str]:
    names = set()
    for line in requires("misotts-agents") or ():
        req = Requirement(line)
        if req.marker is not None and req.marker.evaluate({"extra": extra}):
            names.add(req.name)
    return names


def test_serve_has_an_extra_with_what_it_imports():
    # server/app.py (FastAPI, Prometheus), tools/cli.py serve (uvicorn), server/client.py (websockets)
    assert {"fastapi", "uvicorn", "websockets", "prometheus-client"} <= extra_requirements("server")


def test_the_integrations_url_mode_has_its_client():
    assert "websockets" in extra_requirements("pipecat")
    assert "websockets" in extra_requirements("livekit")


def test_ray_serves_the_same_app():
    assert extra_requirements("server") <= extra_requirements("ray")  # its ingress is the server's app


def test_runtime_requirements_name_neither_original_nor_any_upper_cap():
    # Users resolve our metadata beside the newest frameworks and torch: moshi and silentcipher (stale
    # caps) are dev-only oracles, and a cap of our own would be the next unresolvable install.
    reqs = [Requirement(line) for line in requires("misotts-agents") or ()]
    assert not {"moshi", "silentcipher"} & {req.name for req in reqs}
    capped = [str(req) for req in reqs if any(spec.operator in ("<", "<=", "==", "~=") for spec in req.specifier)]
    assert not capped

"""Podman for the image test (tests/test_image.py): whether it can run here, how to call it, and
the stand-in for `python:3.11-slim` that the image is built on when no registry is reachable.

What this host needs, and why (each learnt the hard way; see docs/deploy.md):
- podman, runc and mmdebstrap from apt (`.ci/run` installs them in CI);
- runc, not crun: crun refuses a kernel with hybrid cgroups v1/v2;
- explicit ulimits: rootful podman asks for nofile 1048576, above this host's hard limit, and
  without CAP_SYS_RESOURCE setrlimit fails;
- `--format docker`: the OCI format drops HEALTHCHECK;
- the host's CA bundle mounted into the build's RUN steps only, so pip trusts what pip on the
  host trusts (an intercepting proxy's CA, where there is one).
"""

from __future__ import annotations

import functools
import os
import resource
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

# The stand-in base stays in podman's storage between runs (a minute saved each time); remove it
# with `podman rmi localhost/python-standin:3.11-slim` to make it anew.
STANDIN = "localhost/python-standin:3.11-slim"
IMAGE = "localhost/transaction-service:test"
# The build stage, tagged so that pruning old images keeps its layers (the locked dependencies,
# rebuilt only when requirements.lock changes).
BUILD_STAGE = "localhost/transaction-service:test-build"
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
APT_SOURCES = (Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list"))
INSTALL_HINT = "apt-get install podman runc mmdebstrap (as root), as .ci/run does"
# Step name -> seconds, printed in the test run's summary (conftest.py).
TIMES: dict[str, float] = {}
SKIPPED: list[str] = []


@functools.cache
def containers_conf() -> Path:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nofile = 1_048_576 if hard == resource.RLIM_INFINITY else hard
    folder = Path(tempfile.mkdtemp(prefix="podman-conf-"))
    path = folder / "containers.conf"
    path.write_text(
        "[containers]\n"
        f'default_ulimits = ["nofile={nofile}:{nofile}", "nproc=4096:4096"]\n'
        "[engine]\n"
        'runtime = "runc"\n'
    )
    return path


def env() -> dict[str, str]:
    return {**os.environ, "CONTAINERS_CONF": str(containers_conf())}


def podman(
    *args: str, check: bool = True, timeout: float = 600, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `podman ARGS`; its output. Fails the test with podman's stderr if `check`."""
    result = subprocess.run(
        ["podman", *args],
        env=env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input,
        check=False,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"podman {' '.join(args)} exited {result.returncode}:\n{result.stderr[-4000:]}"
        )
    return result


@functools.cache
def unavailable_reason() -> str | None:
    """None if podman can build and run images here; else why not."""
    if shutil.which("podman") is None:
        return f"podman is not installed ({INSTALL_HINT})"
    if shutil.which("runc") is None:
        return f"runc is not installed ({INSTALL_HINT})"
    info = podman("info", "--format", "{{.Host.OCIRuntime.Name}}", check=False, timeout=120)
    if info.returncode != 0:
        return f"podman cannot run here: {info.stderr.strip().splitlines()[-1:]}"
    if podman("image", "exists", STANDIN, check=False).returncode != 0 and not shutil.which(
        "mmdebstrap"
    ):
        return f"mmdebstrap is not installed to make the stand-in base ({INSTALL_HINT})"
    return None


def timed(step: str, started: float) -> None:
    TIMES[step] = round(time.monotonic() - started, 1)


def ensure_standin() -> None:
    """`python:3.11-slim` stands in as Debian's python3 with pip and venv, python and pip on PATH
    in /usr/local/bin like the real image, and groupadd/useradd. Made once and kept."""
    started = time.monotonic()
    if podman("image", "exists", STANDIN, check=False).returncode == 0:
        timed("stand-in base (kept from an earlier run)", started)
        return
    sources = next(str(p) for p in APT_SOURCES if p.exists())
    with tempfile.TemporaryDirectory(prefix="standin-") as work:
        tarball = Path(work) / "base.tar"
        subprocess.run(
            [
                "mmdebstrap",
                "--variant=apt",
                "--aptopt=APT::Install-Recommends false",
                "--aptopt=Acquire::Check-Valid-Until false",
                *(
                    f"--dpkgopt=path-exclude=/usr/share/{folder}/*"
                    for folder in ("doc", "man", "locale", "info")
                ),
                "--include=passwd,python3,python3-venv,python3-pip,ca-certificates",
                "--customize-hook="
                'mkdir -p "$1/usr/local/bin";'
                " for n in python python3 python3.11; do"
                ' ln -sf /usr/bin/python3.11 "$1/usr/local/bin/$n"; done;'
                ' ln -sf /usr/bin/pip3 "$1/usr/local/bin/pip"',
                '--customize-hook=rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED',
                '--customize-hook=rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*',
                "bookworm",
                str(tarball),
                sources,
            ],
            capture_output=True,
            text=True,
            timeout=900,
            check=True,
        )
        podman(
            "import",
            "--change",
            "ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin",
            "--change",
            "ENV LANG=C.UTF-8",
            "--change",
            'CMD ["python3"]',
            str(tarball),
            STANDIN,
        )
    timed("stand-in base (mmdebstrap + import)", started)


def build(root: Path, revision: str) -> None:
    """`podman build` of the Dockerfile, on the stand-in base; podman's layer cache is kept, so
    only what changed since the last run is built again."""
    started = time.monotonic()
    mounts: Sequence[str] = ("-v", f"{CA_BUNDLE}:{CA_BUNDLE}:ro") if CA_BUNDLE.exists() else ()
    podman(
        "build",
        "--format",
        "docker",
        "--layers",
        "-t",
        IMAGE,
        "--build-arg",
        f"PYTHON_IMAGE={STANDIN}",
        "--build-arg",
        f"REVISION={revision}",
        *mounts,
        str(root),
        timeout=1800,
    )
    timed("podman build", started)

"""What can be checked of the Docker image without a Docker engine."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def _instructions(name: str) -> list[str]:
    return [line.split(None, 1)[1] for line in DOCKERFILE.splitlines() if line.startswith(name + " ")]


def _arg(name: str) -> str:
    return re.search(rf"^ARG {name}=(\S+)$", DOCKERFILE, re.MULTILINE).group(1)


def test_image_builds_on_an_official_pytorch_cuda_image_with_compilers_and_a_chosen_cuda():
    base = _arg("BASE_IMAGE")
    assert base == "pytorch/pytorch:${TORCH}-cuda${CUDA}-cudnn9-${FLAVOUR}"
    assert _arg("FLAVOUR") == "devel"  # gcc and the CUDA toolkit: torch.compile works in the image
    assert re.fullmatch(r"\d+\.\d+", _arg("CUDA")) and re.fullmatch(r"\d+\.\d+\.\d+", _arg("TORCH"))
    minimum = re.search(r'"torch>=([\d.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    as_tuple = [tuple(int(part) for part in version.split(".")[:2]) for version in (_arg("TORCH"), minimum)]
    assert as_tuple[0] >= as_tuple[1]  # else pip would replace the base image's CUDA torch
    assert _instructions("FROM") == ["${BASE_IMAGE}"]


def test_compiled_kernels_are_cached_on_the_writable_runs_volume():
    for variable in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        assert re.search(rf"{variable}=/runs/\S+", DOCKERFILE), variable


def test_image_installs_the_package_and_its_own_entry_point():
    assert any("pip install ." in run and "glowtrain --version" in run for run in _instructions("RUN"))
    assert _instructions("ENTRYPOINT") == ['["glowtrain"]']
    entry = re.search(r'^glowtrain = "([\w.]+):(\w+)"$', (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    module, function = entry.groups()
    assert module == "glowtrain.cli" and function == "main"
    import glowtrain.cli

    assert callable(getattr(glowtrain.cli, function))


def test_every_path_the_image_copies_exists_and_tests_stay_out():
    for copy in _instructions("COPY"):
        sources = [part for part in copy.split()[:-1] if not part.startswith("--")]
        for source in sources:
            assert (ROOT / source).exists(), source
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and "runs" in ignored and "data" in ignored


def test_image_runs_as_a_non_root_user_with_data_and_runs_volumes():
    user = _instructions("USER")
    assert user and user[-1] not in ("root", "0")
    assert _instructions("VOLUME") == ['["/data", "/runs"]']
    assert _instructions("EXPOSE") == ["6006"]


README = (ROOT / "README.md").read_text()


@pytest.mark.parametrize("path", sorted(set(re.findall(r"(?<![\w/.-])((?:scripts|configs)/[\w.-]+)", README))))
def test_paths_named_in_the_readme_exist(path):
    assert (ROOT / path).exists(), path

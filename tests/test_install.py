"""A wheel built from the tracked sources installs into a fresh virtualenv and works from
outside the source tree: the CLI, info on a GGUF, the (cached) build, the demo's model."""
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run(*args, cwd=None, **kw):
    r = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=600, **kw)
    assert r.returncode == 0, f"{args}: {r.stdout[-2000:]}{r.stderr[-3000:]}"
    return r


def test_wheel_installs_and_runs_outside_the_tree(tmp_path, tiny_gguf):
    # the sources as a clean clone has them (tracked, or new and not ignored)
    files = run("git", "ls-files", "--cached", "--others", "--exclude-standard", cwd=REPO).stdout.split("\n")
    src = tmp_path / "src"
    for f in filter(None, files):
        if (REPO / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            (src / f).write_bytes((REPO / f).read_bytes())
    # no network: the build backend is the one of this environment
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist", src)
    (whl,) = (tmp_path / "dist").glob("orthrus_gguf-*.whl")
    names = set(zipfile.ZipFile(whl).namelist())
    for want in ("orthrus_gguf/py.typed", "orthrus_gguf/convert/__init__.py",
                 "orthrus_gguf/_native_data/patches/0001-arch-keys-and-tensor-names.patch",
                 "orthrus_gguf/_native_data/native/src/llama-orthrus.cpp",
                 "orthrus_gguf/_native_data/models/orthrus-tiny/config.json"):
        assert want in names, want
    # a fresh virtualenv; the dependencies come from this one's site-packages (a path in a
    # .pth: its own .pth files, like this checkout's editable install, are not read)
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv)
    py = venv / "bin" / "python"
    site = Path(run(py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run(py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", whl)
    exe = venv / "bin" / "orthrus-gguf"
    out = tmp_path / "elsewhere"
    out.mkdir()
    assert "convert" in run(exe, "--help", cwd=out).stdout
    assert "orthrus-qwen3" in run(exe, "info", tiny_gguf("f32", tied=False), cwd=out).stdout
    lib = Path(run(exe, "build", cwd=out).stdout.strip().splitlines()[-1])  # the cached build: same inputs
    assert (lib / "libllama.so").exists() or (lib / "libllama.dylib").exists()
    r = run(py, "-c", "import orthrus_gguf, orthrus_gguf.checkpoint, orthrus_gguf.convert\n"
                      "from orthrus_gguf.build import data_root\nfrom orthrus_gguf.demo import embedded_model\n"
                      "print(orthrus_gguf.__file__, data_root(), embedded_model())", cwd=out)
    pkg, root, model = r.stdout.split()
    assert pkg.startswith(str(venv)) and root.startswith(str(venv)) and model.startswith(str(venv))

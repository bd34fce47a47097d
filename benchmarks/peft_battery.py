"""Run PEFT's own common test battery (the pinned peft release's tests/testing_common.py and
tests/test_custom_models.py, unmodified) against hfcompress's PEFT methods; write a JSON summary.

    flock /work/bench.lock python benchmarks/peft_battery.py            # all methods
    python benchmarks/peft_battery.py --sdist peft-0.21.2.tar.gz -k l4q  # a local sdist, one method

The test files come from the sdist of the installed peft version (``pip download
peft==<version> --no-deps --no-binary :all:``, or ``--sdist``); their SHA-256 digests are recorded.
They are copied byte for byte into a temporary package beside a harness module
(benchmarks/peft_battery/harness.py) that replaces PEFT's row lists with ours
(benchmarks/peft_battery/rows.py) before collection. Only checks parametrized with one of our
methods run (PEFT's method-specific tests, e.g. LoRA's DoRA merges, are deselected).

A failure whose message is one of our documented refusals (REFUSALS below: a feature the
method refuses with a clear error) is counted as ``refused``; a failed assertion of PEFT's that
checks a convention one of our methods documents it does not follow (DIFFERENCES below: L4Q's fresh
adapter computes the quantized model, not the base) as ``differs``; every other failure as ``failed``.
``testing_utils.py`` imports ``datasets`` and ``testing_common.py`` ``diffusers`` at module level
(used only by hub / Stable Diffusion tests that are not part of this battery); when they are not
installed, placeholder modules that raise on use stand in for them (recorded in the JSON).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
FILES = ("testing_common.py", "testing_utils.py", "test_custom_models.py")

_NOT_IDENTITY = "identity at initialisation (a fresh L4Q adapter computes the quantized model; its base is the float model)"

#: (method or "*", the failing source line of PEFT's test) -> the convention the method documents it does not follow
#: (no error is raised: PEFT's assertion fails; PEFT special-cases its own non-identity methods, e.g. KaSA, PaRa)
DIFFERENCES = {
    ("l4q", "assert torch.allclose(outputs_base, outputs_before)"): _NOT_IDENTITY,
    ("l4q", "assert torch.allclose(outputs_before, outputs_disabled"): _NOT_IDENTITY,
}

#: (method or "*", substring of the error or of the failing source line) -> the refused feature, as README lists it
REFUSALS = {
    ("compacter", "output size 1 leaves nothing to factor"):
        "a target layer with a single output (nothing to factor: PEFT's EmbConv1D Conv1D(nf=1))",
    ("compacter", "Compacter adapters cannot be merged"): "merge (non-linear adapter: no weight delta)",
    ("compacter", "Compacter has no weight delta"): "merge (non-linear adapter: no weight delta)",
    ("l4q", "L4QConfig.modules_to_save is not supported"): "modules_to_save",
    ("l4q", "L4Q quantizes one merged weight per layer"): "several active adapters on one layer",
    ("l4q", "L4Q can merge one adapter per layer"): "several active adapters on one layer",
    ("l4q", "L4Q merges exactly one adapter"): "several active adapters on one layer",
    ("*", "add_weighted_adapter"): "add_weighted_adapter (LoRA only)",
}

PLACEHOLDERS = {
    "datasets": "def load_dataset(*args, **kwargs):\n"
                "    raise RuntimeError('datasets is not installed; placeholder from benchmarks/peft_battery.py')\n",
    "diffusers": "class StableDiffusionPipeline:\n"
                 "    def __init__(self, *args, **kwargs):\n"
                 "        raise RuntimeError('diffusers is not installed; placeholder from benchmarks/peft_battery.py')\n"
                 "    from_pretrained = classmethod(lambda cls, *a, **k: cls())\n",
}


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def get_sdist(version: str, given: str | None, cache: str) -> str:
    if given:
        return given
    os.makedirs(cache, exist_ok=True)
    path = os.path.join(cache, f"peft-{version}.tar.gz")
    if not os.path.exists(path):
        subprocess.run([sys.executable, "-m", "pip", "download", f"peft=={version}", "--no-deps", "--no-binary",
                        ":all:", "-d", cache, "-q"], check=True)
    return path


def git_commit() -> str:
    """The checkout's commit, with "+dirty" when tracked files other than benchmarks/results/ differ from it."""
    def git(*a):
        return subprocess.run(["git", *a], cwd=HERE, capture_output=True, text=True).stdout.strip()
    return (git("rev-parse", "--short", "HEAD") or "unknown") + ("+dirty" if git("status", "--porcelain", "-uno", "--", ":/", ":!/benchmarks/results") else "")


def build_package(sdist: str, version: str, work: str) -> dict[str, str]:
    pkg = os.path.join(work, "peft_tests")
    os.makedirs(pkg)
    digests = {}
    with tarfile.open(sdist) as tar:
        for name in FILES:
            member = tar.getmember(f"peft-{version}/tests/{name}")
            data = tar.extractfile(member).read()
            with open(os.path.join(pkg, name), "wb") as f:
                f.write(data)
            digests[name] = hashlib.sha256(data).hexdigest()
    open(os.path.join(pkg, "__init__.py"), "w").close()
    shutil.copy(os.path.join(HERE, "peft_battery", "harness.py"), os.path.join(pkg, "test_hfcompress_methods.py"))
    shutil.copy(os.path.join(HERE, "peft_battery", "conftest.py"), os.path.join(pkg, "conftest.py"))
    with open(os.path.join(work, "pytest.ini"), "w") as f:
        f.write("[pytest]\n")
    return digests


def placeholders(work: str) -> list[str]:
    import importlib.util

    used = []
    root = os.path.join(work, "_placeholders")
    for name, code in PLACEHOLDERS.items():
        if importlib.util.find_spec(name) is None:
            os.makedirs(os.path.join(root, name))
            with open(os.path.join(root, name, "__init__.py"), "w") as f:
                f.write(code)
            used.append(name)
    return used


def failing_line(text: str) -> str:
    """The source line pytest marks with '>' last in a failure's traceback (where it failed)."""
    marked = [line[1:].strip() for line in text.splitlines() if line.startswith(">")]
    return marked[-1] if marked else ""


def classify(method: str, message: str) -> tuple[str, str | None]:
    """(outcome, feature) of a failure: ("refused", the feature) for an error message of ours in
    REFUSALS, ("differs", the convention) for a failing line of PEFT's test in DIFFERENCES, else ("failed", None)."""
    errors = [message.split("\n", 1)[0], failing_line(message)]
    errors += [line for line in message.splitlines() if line.startswith("E ")]  # pytest's error lines
    mine = ("*", method.rstrip("+"))
    for (who, text), feature in DIFFERENCES.items():
        if who in mine and failing_line(message).startswith(text):
            return "differs", feature
    for (who, text), feature in REFUSALS.items():
        if who in mine and any(text in line for line in errors):
            return "refused", feature
    return "failed", None


def parse(junit: str) -> list[dict]:
    out = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        name = case.get("name")
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome = {"failure": "failed", "error": "failed", "skipped": "skipped"}[tag]
                message = (el.get("message") or "") + "\n" + (el.text or "")
                break
        method = props.get("method", "?")
        feature = None
        if outcome == "failed":
            outcome, feature = classify(method, message)
        out.append({"method": method, "test": name.split("[")[0], "id": name, "class": case.get("classname"),
                    "outcome": outcome, "feature": feature,
                    "message": (message.strip().splitlines() or [""])[0][:300], "line": failing_line(message)[:200]})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sdist", help="peft-<version>.tar.gz (default: pip download the installed version's sdist)")
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/hfcompress/peft_sdist"))
    ap.add_argument("-k", default=None, help="pytest -k expression")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "peft_battery.json"))
    args = ap.parse_args(argv)

    import peft
    import torch
    import transformers

    version = peft.__version__
    sdist = get_sdist(version, args.sdist, args.cache)
    work = tempfile.mkdtemp(prefix="peft_battery_")
    try:
        digests = build_package(sdist, version, work)
        used_placeholders = placeholders(work)
        junit = os.path.join(work, "junit.xml")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [os.path.join(HERE, "peft_battery"), work, os.path.join(work, "_placeholders"),
             os.environ.get("PYTHONPATH", "")]))
        cmd = [sys.executable, "-m", "pytest", os.path.join(work, "peft_tests", "test_hfcompress_methods.py"),
               "-c", os.path.join(work, "pytest.ini"), "--rootdir", work, "-q", "-p", "no:randomly",
               "-p", "no:cacheprovider", f"--junitxml={junit}", "-o", "junit_family=xunit1"]
        if args.workers > 1:
            cmd += ["-n", str(args.workers)]
        if args.k:
            cmd += ["-k", args.k]
        commit = git_commit()  # before the run (the checkout the checks ran on)
        load_before = os.getloadavg()
        t0 = time.time()
        proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
        wall = time.time() - t0
        if not os.path.exists(junit):
            print(proc.stdout[-5000:], proc.stderr[-5000:])
            return 1
        cases = parse(junit)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    per_method: dict[str, Counter] = defaultdict(Counter)
    per_test: dict[str, dict[str, Counter]] = defaultdict(lambda: defaultdict(Counter))
    refused: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    differs: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for c in cases:
        per_method[c["method"]][c["outcome"]] += 1
        per_test[c["method"]][c["test"]][c["outcome"]] += 1
        if c["outcome"] in ("refused", "differs"):
            (refused if c["outcome"] == "refused" else differs)[c["method"]][c["feature"]].append(c["test"])
    summary = {
        "what": "PEFT's common battery (pinned release's tests/testing_common.py + tests/test_custom_models.py, "
                "unmodified) run on hfcompress's PEFT methods; checks parametrized with our rows only",
        "commit": commit, "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t0)),
        "peft_version": version, "sdist_sha256": sha256(sdist), "test_files_sha256": digests,
        "placeholder_modules": used_placeholders, "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "k": args.k, "workers": args.workers, "wall_s": round(wall, 1),
        "loadavg_before": [round(x, 2) for x in load_before], "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "pytest_exit_code": proc.returncode,
        "pytest_summary": (proc.stdout.strip().splitlines() or [""])[-1],  # incl. PEFT's method-specific tests deselected
        "per_method": {m: {k: per_method[m][k] for k in ("passed", "failed", "refused", "differs", "skipped")}
                       | {"total": sum(per_method[m].values())} for m in sorted(per_method)},
        "refused_checks": {m: {f: sorted(set(t)) for f, t in fs.items()} for m, fs in sorted(refused.items())},
        "documented_differences": {m: {f: sorted(set(t)) for f, t in fs.items()} for m, fs in sorted(differs.items())},
        "failed_checks": sorted({f"{c['method']}: {c['id']}: {c['message']} [at: {c['line']}]" for c in cases
                                 if c["outcome"] == "failed"}),
        "skipped_checks": sorted({f"{c['method']}: {c['test']}: {c['message']}" for c in cases
                                  if c["outcome"] == "skipped"}),
        "per_test": {m: {t: dict(v) for t, v in sorted(ts.items())} for m, ts in sorted(per_test.items())},
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".tmp", "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(args.out + ".tmp", args.out)
    for m, counts in summary["per_method"].items():
        print(f"{m:12s} {counts}")
    print(f"wrote {args.out} ({wall:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Live cross-check of `fedsb-client privacy` against the REAL Opacus 1.5.2 RDP accountant, on random inputs.

How to run (numpy and scipy are the only Python packages needed; torch is NOT needed and is never imported):

    python3 -m venv /tmp/opacus-venv && /tmp/opacus-venv/bin/pip install numpy scipy
    pip download opacus==1.5.2 --no-deps -d /tmp/opacus-whl     # optional: without --wheel the script downloads it
    /tmp/opacus-venv/bin/python scripts/check-privacy-cli.py \
        --wheel /tmp/opacus-whl/opacus-1.5.2-py3-none-any.whl \
        --cli ~/.cache/fedsb/target/debug/fedsb-client --cases 200 --seed 1

Opacus is loaded from the wheel exactly as scripts/opacus-vectors.py does (its `load_opacus` is imported from that
file: zipimport of the wheel, with stubs for the torch-dependent `opacus/__init__` and `opacus.optimizers`).

What is checked, each case through one run of the CLI (a subprocess; the number is the LAST line of its stdout):

  * `privacy epsilon --sample-rate q --noise-multiplier σ --steps T --delta δ` against Opacus'
    `RDPAccountant` (history [(σ, q, T)], DEFAULT_ALPHAS) `get_privacy_spent(delta=δ)[0]`, with q log-uniform in
    [1e-4, 1], σ log-uniform in [0.3, 20], T a log-uniform integer in [1, 1e5], δ log-uniform in [1e-9, 1e-3]
    (`--cases` cases);
  * `privacy noise --target-epsilon ε --delta δ --sample-rate q --steps T [--epsilon-tolerance tol]` against
    `get_noise_multiplier(target_epsilon=ε, target_delta=δ, sample_rate=q, steps=T, accountant="rdp",
    epsilon_tolerance=tol)`, ε log-uniform in [0.5, 20], tol one of default (flag omitted: 0.01 on both sides), 0.01,
    0.001, 0.1; draws on which Opacus raises are skipped (counted) until `--noise-cases` cases (default: --cases / 4)
    are kept;
  * budgets on which Opacus raises ("The privacy budget is too low."): a fixed one and a few random draws with
    ε in [0.01, 0.3]; where Opacus raises, the CLI must exit non-zero (where it does not, the σ is compared as above).

A number passes when |CLI - Opacus| <= --tolerance, absolutely, or relatively to Opacus' value when that exceeds 100
(both infinite and equal also passes). A CLI that exits non-zero or prints no number on its last line fails the case.
Prints a summary (cases, max |Δε|, max |Δσ|, every failure with its inputs) and exits 1 on any failure.
"""
import argparse
import glob
import importlib.util
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
TOLERANCES = [None, 0.01, 0.001, 0.1]  # None: --epsilon-tolerance omitted, Opacus' default 0.01
N_RANDOM_ERROR = 8  # random low-budget noise draws, besides the fixed one
FIXED_ERROR = (0.05, 1e-9, 0.01, 1000, None)  # (target ε, δ, q, steps, tol): below the σ = 1e6 floor


def import_vectors_module():
    """scripts/opacus-vectors.py as a module (its top level only defines; main() is behind the __main__ guard)."""
    spec = importlib.util.spec_from_file_location("opacus_vectors", os.path.join(HERE, "opacus-vectors.py"))
    module = importlib.util.module_from_spec(spec)
    dont_write = sys.dont_write_bytecode
    sys.dont_write_bytecode = True  # leave no __pycache__ behind in scripts/
    try:
        spec.loader.exec_module(module)
    finally:
        sys.dont_write_bytecode = dont_write
    return module


def fetch_wheel(directory):
    """`pip download opacus==1.5.2 --no-deps` into directory; the path of the wheel."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "opacus==1.5.2", "--no-deps", "--only-binary=:all:", "-d", directory],
        check=True,
        stdout=sys.stderr,
    )
    wheels = glob.glob(os.path.join(directory, "opacus-1.5.2-*.whl"))
    if len(wheels) != 1:
        sys.exit(f"pip download: expected one opacus 1.5.2 wheel in {directory}, found {wheels}")
    return wheels[0]


def check_wheel_version(wheel):
    with zipfile.ZipFile(wheel) as z:
        text = z.read("opacus/version.py").decode()
    if '__version__ = "1.5.2"' not in text:
        sys.exit(f"{wheel} is not Opacus 1.5.2 (opacus/version.py: {text.strip().splitlines()[-1]!r})")


def default_cli():
    target = os.environ.get("CARGO_TARGET_DIR") or os.path.expanduser("~/.cache/fedsb/target")
    return os.path.join(target, "debug", "fedsb-client")


def run_cli(cli, args):
    """(number or None, error message or None) of one CLI run."""
    env = dict(os.environ, RUST_BACKTRACE="0", RUST_LIB_BACKTRACE="0")
    cmd = [cli, "privacy"] + args
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    except subprocess.TimeoutExpired:
        return None, "timed out after 120 s"
    if p.returncode != 0:
        lines = p.stderr.strip().splitlines()
        return None, f"exit {p.returncode}: {lines[0] if lines else '(no stderr)'}"
    lines = p.stdout.strip().splitlines()
    try:
        return float(lines[-1]), None
    except (IndexError, ValueError):
        return None, f"last stdout line is not a number: {lines[-1] if lines else '(no stdout)'!r}"


def diff(got, want):
    """|got - want|, relative to |want| when that exceeds 100; 0 for equal infinities."""
    if got == want:
        return 0.0
    d = abs(got - want)
    if math.isnan(d):
        return math.inf
    return d / abs(want) if abs(want) > 100 else d


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wheel", help="the opacus 1.5.2 wheel (default: pip download it into a temporary directory)")
    ap.add_argument("--cli", default=default_cli(), help="fedsb-client (default: %(default)s)")
    ap.add_argument("--cases", type=int, default=200, help="random epsilon cases (default: %(default)s)")
    ap.add_argument("--noise-cases", type=int, help="random noise cases Opacus solves (default: cases / 4)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--tolerance", type=float, default=1e-4)
    args = ap.parse_args()
    n_noise = args.noise_cases if args.noise_cases is not None else args.cases // 4
    if not (os.path.isfile(args.cli) and os.access(args.cli, os.X_OK)):
        sys.exit(f"no executable CLI at {args.cli} (build fedsb-client, or pass --cli)")

    tmp = None
    try:
        wheel = args.wheel
        if wheel is None:
            tmp = tempfile.mkdtemp(prefix="opacus-whl-")
            wheel = fetch_wheel(tmp)
        check_wheel_version(wheel)
        vectors = import_vectors_module()
        _, utils, RDPAccountant = vectors.load_opacus(wheel)
        return check(args, n_noise, wheel, vectors.log_uniform, utils, RDPAccountant)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def check(args, n_noise, wheel, log_uniform, utils, RDPAccountant):
    warnings.simplefilter("ignore")  # "Optimal order is the largest alpha ..." warnings
    rng = random.Random(args.seed)
    t0 = time.time()
    failures = []

    def log_int(lo, hi):
        return int(round(log_uniform(rng, lo, hi)))

    # ε of (q, σ, T, δ).
    max_eps = (0.0, None)
    for _ in range(args.cases):
        q, sigma = log_uniform(rng, 1e-4, 1.0), log_uniform(rng, 0.3, 20.0)
        steps, delta = log_int(1, 1e5), log_uniform(rng, 1e-9, 1e-3)
        inputs = f"epsilon --sample-rate {q!r} --noise-multiplier {sigma!r} --steps {steps} --delta {delta!r}"
        acc = RDPAccountant()
        acc.history = [(sigma, q, steps)]
        want = float(acc.get_privacy_spent(delta=delta)[0])
        got, err = run_cli(args.cli, inputs.split())
        if err is not None:
            failures.append(f"{inputs}: CLI {err} (Opacus ε = {want!r})")
            continue
        d = diff(got, want)
        if max_eps[1] is None or d > max_eps[0]:
            max_eps = (d, inputs)
        if not d <= args.tolerance:
            failures.append(f"{inputs}: CLI ε = {got!r}, Opacus ε = {want!r}, |Δ| = {d:.3g}")

    # σ for a target ε.
    def opacus_noise(target, delta, q, steps, tol):
        try:
            return utils.get_noise_multiplier(
                target_epsilon=target,
                target_delta=delta,
                sample_rate=q,
                steps=steps,
                accountant="rdp",
                epsilon_tolerance=0.01 if tol is None else tol,
            ), None
        except Exception as e:
            return None, f"{type(e).__name__}: {e}"

    max_sigma = (0.0, None)
    counts = {"noise": 0, "skipped": 0, "error": 0, "low_solved": 0}

    def noise_case(target, delta, q, steps, tol, opacus_result, kind="noise"):
        nonlocal max_sigma
        want, opacus_err = opacus_result
        inputs = f"noise --target-epsilon {target!r} --delta {delta!r} --sample-rate {q!r} --steps {steps}"
        if tol is not None:
            inputs += f" --epsilon-tolerance {tol!r}"
        got, err = run_cli(args.cli, inputs.split())
        if opacus_err is not None:
            counts["error"] += 1
            if err is None:
                failures.append(f"{inputs}: Opacus raises ({opacus_err}) but the CLI exits 0 with σ = {got!r}")
            return
        counts[kind] += 1
        if err is not None:
            failures.append(f"{inputs}: CLI {err} (Opacus σ = {want!r})")
            return
        d = diff(got, float(want))
        if max_sigma[1] is None or d > max_sigma[0]:
            max_sigma = (d, inputs)
        if not d <= args.tolerance:
            failures.append(f"{inputs}: CLI σ = {got!r}, Opacus σ = {want!r}, |Δ| = {d:.3g}")

    kept = 0
    while kept < n_noise:
        target, delta = log_uniform(rng, 0.5, 20.0), log_uniform(rng, 1e-9, 1e-3)
        q, steps, tol = log_uniform(rng, 1e-4, 1.0), log_int(1, 1e5), rng.choice(TOLERANCES)
        result = opacus_noise(target, delta, q, steps, tol)
        if result[1] is not None:
            counts["skipped"] += 1
            continue
        kept += 1
        noise_case(target, delta, q, steps, tol, result)

    # Budgets too low for Opacus: the CLI must fail too.
    low = [FIXED_ERROR]
    for _ in range(N_RANDOM_ERROR):
        target, delta = log_uniform(rng, 0.01, 0.3), log_uniform(rng, 1e-9, 1e-3)
        low.append((target, delta, log_uniform(rng, 1e-4, 1.0), log_int(1, 1e5), None))
    for case in low:
        noise_case(*case, opacus_noise(*case), kind="low_solved")
    fixed_raises = opacus_noise(*FIXED_ERROR)[1] is not None
    if not fixed_raises:
        failures.append(f"fixed low-budget case {FIXED_ERROR}: Opacus was expected to raise and did not")

    print(f"check-privacy-cli: {args.cli} against Opacus 1.5.2 ({os.path.basename(wheel)})")
    print(f"seed {args.seed}, tolerance {args.tolerance:g} (absolute; relative above 100), {time.time() - t0:.1f} s")
    print(f"epsilon cases: {args.cases}, max |Δε| = {max_eps[0]:.3g}" + (f"  [{max_eps[1]}]" if max_eps[0] else ""))
    print(
        f"noise cases: {counts['noise']} (+{counts['skipped']} random draws skipped: Opacus raises)"
        f" + {counts['low_solved']} low-budget draws Opacus solves, max |Δσ| = {max_sigma[0]:.3g}"
        + (f"  [{max_sigma[1]}]" if max_sigma[0] else "")
    )
    print(f"budget-too-low cases (Opacus raises, the CLI must exit non-zero): {counts['error']}")
    print(f"failures: {len(failures)}")
    for f in failures:
        print(f"  FAIL {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

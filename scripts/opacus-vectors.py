"""Reference vectors for the Rust RDP accountant (common/src/dp/accountant.rs), computed by the REAL Opacus 1.5.2.

How to run (numpy and scipy are the only Python packages needed; torch is NOT needed and is never imported):

    pip download opacus==1.5.2 --no-deps -d /tmp/opacus-whl
    python3 -m venv /tmp/opacus-venv && /tmp/opacus-venv/bin/pip install numpy scipy
    /tmp/opacus-venv/bin/python scripts/opacus-vectors.py \
        --wheel /tmp/opacus-whl/opacus-1.5.2-py3-none-any.whl \
        --out common/tests/data/opacus_rdp_vectors.json

How Opacus is loaded without torch: the wheel (a zip) is imported in place through Python's zipimport. The top-level
`opacus` package is replaced by an empty package whose __path__ points into the wheel (its real __init__ imports
torch), and `opacus.optimizers` by a stub that only defines the class name `DPOptimizer` (the single torch-dependent
import of `opacus/accountants/accountant.py`, used there only in a type annotation). Everything the vectors come from
is Opacus' own unmodified code: `opacus/accountants/analysis/rdp.py` (compute_rdp, get_privacy_spent, _log_erfc),
`opacus/accountants/rdp.py` (RDPAccountant, DEFAULT_ALPHAS) and `opacus/accountants/utils.py` (get_noise_multiplier).

Deterministic: the cases depend only on the fixed seed below (and the numbers on Opacus, numpy and scipy).
Non-finite numbers are written as the strings "inf", "-inf" and "nan" (JSON has no literal for them). A case on which
Opacus raises records the exception under "error" instead of a result.
"""
import argparse
import hashlib
import json
import math
import os
import random
import sys
import time
import types
import warnings

SEED = 20260317
N_EPSILON = 300
N_MULTI = 20
N_RDP = 20
N_NOISE = 40


def load_opacus(wheel):
    """Import Opacus' accountant modules from the wheel without running opacus/__init__ (which imports torch)."""
    pkg = types.ModuleType("opacus")
    pkg.__path__ = [os.path.join(os.path.abspath(wheel), "opacus")]
    sys.modules["opacus"] = pkg
    optimizers = types.ModuleType("opacus.optimizers")

    class DPOptimizer:  # stand-in for the torch optimizer class; only used as a type annotation
        pass

    optimizers.DPOptimizer = DPOptimizer
    sys.modules["opacus.optimizers"] = optimizers
    import opacus.accountants  # noqa: F401  (the real package __init__, from the wheel)
    import opacus.accountants.analysis.rdp as analysis
    import opacus.accountants.utils as utils
    from opacus.accountants import RDPAccountant

    assert analysis.__file__.startswith(os.path.abspath(wheel)), analysis.__file__
    return analysis, utils, RDPAccountant


def num(x):
    """A float for JSON: finite numbers as numbers, the others as strings."""
    x = float(x)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


def log_uniform(rng, lo, hi):
    return math.exp(rng.uniform(math.log(lo), math.log(hi)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wheel", default="/tmp/opacus-whl/opacus-1.5.2-py3-none-any.whl")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    with open(args.wheel, "rb") as f:
        wheel_sha = hashlib.sha256(f.read()).hexdigest()
    analysis, utils, RDPAccountant = load_opacus(args.wheel)
    import numpy
    import scipy

    warnings.simplefilter("ignore")  # "Optimal order is the largest alpha ..." warnings
    rng = random.Random(SEED)
    t0 = time.time()

    def accountant_eps(history, delta):
        acc = RDPAccountant()
        acc.history = [tuple(h) for h in history]
        try:
            eps, order = acc.get_privacy_spent(delta=delta)
            return {"eps": num(eps), "order": num(order)}
        except Exception as e:  # recorded: the Rust port must fail too
            return {"error": f"{type(e).__name__}: {e}"}

    epsilon_cases = []

    def add_eps(history, delta, note=None):
        case = {"history": [[num(s), num(q), int(t)] for s, q, t in history], "delta": delta}
        if note:
            case["note"] = note
        case.update(accountant_eps(history, delta))
        epsilon_cases.append(case)

    # Fixed cases: the table of the brief and the special cases of _compute_rdp.
    add_eps([(1.0, 0.01, 1000)], 1e-5, "fixed")
    add_eps([(1.1, 0.004, 10000)], 1e-5, "fixed")
    add_eps([(0.8, 0.05, 200)], 1e-6, "fixed")
    add_eps([(2.0, 1.0, 100)], 1e-5, "fixed: q = 1")
    add_eps([(1.0, 0.0, 100)], 1e-5, "fixed: q = 0")
    add_eps([(0.0, 0.01, 100)], 1e-5, "fixed: sigma = 0")
    add_eps([(0.0, 0.0, 100)], 1e-5, "fixed: q = 0 and sigma = 0")
    add_eps([(1.0, 0.01, 0)], 1e-5, "fixed: steps = 0")
    add_eps([(0.0, 0.01, 0)], 1e-5, "fixed: sigma = 0, steps = 0 (inf * 0)")
    add_eps([(0.5, 0.5, 1)], 1e-5, "fixed: q = 1/2")
    add_eps([(20.0, 0.999, 100000)], 1e-9, "fixed: q near 1, large sigma")
    add_eps([(0.3, 1e-4, 1)], 1e-3, "fixed")
    for i in range(N_EPSILON):
        q = log_uniform(rng, 1e-4, 1.0)
        sigma = log_uniform(rng, 0.3, 20.0)
        steps = int(round(log_uniform(rng, 1.0, 1e5)))
        delta = log_uniform(rng, 1e-9, 1e-3)
        add_eps([(sigma, q, steps)], delta)
    for i in range(N_MULTI):
        history = []
        for _ in range(rng.randint(2, 3)):
            history.append(
                (log_uniform(rng, 0.3, 20.0), log_uniform(rng, 1e-4, 1.0), int(round(log_uniform(rng, 1.0, 1e4))))
            )
        add_eps(history, log_uniform(rng, 1e-9, 1e-3), "composition")
    print(f"epsilon cases: {len(epsilon_cases)} ({time.time() - t0:.0f} s)", file=sys.stderr)

    # The docstring example of analysis/rdp.py: orders 2..32, two mechanisms composed.
    orders = list(range(2, 33))
    rdp = numpy.zeros_like(orders, dtype=float)
    parameters = [(1e-5, 1.0, 10), (1e-4, 3.0, 4)]
    for q, sigma, steps in parameters:
        rdp += analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders)
    eps, order = analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=1e-5)
    docstring = {
        "parameters_q_sigma_steps": [list(p) for p in parameters],
        "orders": orders,
        "delta": 1e-5,
        "rdp": [num(r) for r in rdp],
        "eps": num(eps),
        "order": num(order),
    }

    # Per-order RDP of one step, all default orders.
    rdp_cases = []
    fixed_rdp = [(0.01, 1.0), (0.5, 0.3), (0.999, 20.0), (1e-4, 20.0), (0.3, 5.0)]
    for i in range(N_RDP):
        if i < len(fixed_rdp):
            q, sigma = fixed_rdp[i]
        else:
            q, sigma = log_uniform(rng, 1e-4, 1.0), log_uniform(rng, 0.3, 20.0)
        r = analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS)
        rdp_cases.append({"q": q, "sigma": sigma, "rdp": [num(v) for v in r]})
    print(f"rdp cases: {len(rdp_cases)} ({time.time() - t0:.0f} s)", file=sys.stderr)

    # _log_erfc (scipy's log_ndtr) on a grid from -40 to 1e4.
    xs = [-40.0, -10.0, -3.0, -1.0, -0.5, -1e-3, 0.0, 1e-3, 0.5, 0.7, 0.7071, 0.7072, 0.75, 1.0, 1.5, 2.0, 3.0]
    xs += [5.0, 8.0, 10.0, 15.0, 20.0, 25.0, 25.9, 26.0, 26.1, 26.5, 27.0, 27.3, 28.0, 30.0, 40.0, 50.0, 100.0]
    xs += [300.0, 1e3, 1e4]
    xs += [rng.uniform(-5.0, 40.0) for _ in range(40)]
    log_erfc = [{"x": x, "y": num(analysis._log_erfc(x))} for x in xs]

    # get_noise_multiplier (accountant="rdp").
    noise_cases = []
    fixed_noise = [(1.0, 1e-5, 0.01, 1000, 0.01), (8.0, 1e-5, 0.004, 10000, 0.01), (3.0, 1e-6, 0.05, 200, 0.001)]
    fixed_noise += [(0.05, 1e-9, 0.01, 1000, 0.01)]  # below the q = 0 floor: "The privacy budget is too low."
    for i in range(N_NOISE + len(fixed_noise)):
        if i < len(fixed_noise):
            target, delta, q, steps, tol = fixed_noise[i]
        else:
            target = log_uniform(rng, 0.5, 20.0)
            delta = log_uniform(rng, 1e-9, 1e-3)
            q = log_uniform(rng, 1e-4, 1.0)
            steps = int(round(log_uniform(rng, 1.0, 1e5)))
            tol = rng.choice([0.01, 0.01, 0.001, 0.1])
        case = {"target_epsilon": target, "delta": delta, "q": q, "steps": steps, "epsilon_tolerance": tol}
        try:
            sigma = utils.get_noise_multiplier(
                target_epsilon=target,
                target_delta=delta,
                sample_rate=q,
                steps=steps,
                accountant="rdp",
                epsilon_tolerance=tol,
            )
            case["sigma"] = num(sigma)
        except Exception as e:
            case["error"] = f"{type(e).__name__}: {e}"
        noise_cases.append(case)
    print(f"noise cases: {len(noise_cases)} ({time.time() - t0:.0f} s)", file=sys.stderr)

    doc = {
        "generator": "scripts/opacus-vectors.py",
        "seed": SEED,
        "opacus_version": "1.5.2",
        "opacus_wheel": os.path.basename(args.wheel),
        "opacus_wheel_sha256": wheel_sha,
        "numpy_version": numpy.__version__,
        "scipy_version": scipy.__version__,
        "default_alphas": [num(a) for a in RDPAccountant.DEFAULT_ALPHAS],
        "epsilon_cases": epsilon_cases,
        "docstring_example": docstring,
        "rdp_cases": rdp_cases,
        "log_erfc": log_erfc,
        "noise_cases": noise_cases,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1, allow_nan=False)
        f.write("\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()

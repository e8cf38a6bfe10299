"""`boed run --policy RUN_POL`: scan one image with an amortised policy and draw its choices.

Per scan: the observation so far, the policy's probability map pi(l | y) with the chosen
location, and, when the IPA model of ``--ipa`` is available, greedy EIG-IPA's EIG map of the same
state beside it (what the policy amortises). Writes ``step_t.png``, ``summary.png`` and
``scans.json`` into the output folder.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from matplotlib.figure import Figure

from boed.geometry import ScanGeometry
from boed.heatmaps import _save, draw_grid_heatmap, draw_observation, scan_out_dir
from boed.policies import GreedyPolicy
from boed.samplers import IPASampler
from boed.scan_loop import Decision, scan_image
from xray.io import atomic_write_json

from .network import load_policy


def plot_policy_step(path, geometry: ScanGeometry, x_obs, mask, probs, chosen: int, x_after, mask_after,
                     locations_before=(), eig=None, title: str = "", dpi: int = 110) -> None:
    """Observation, pi heatmap (red x on the choice), EIG heatmap if given, state after the scan."""
    cols = 4 if eig is not None else 3
    fig = Figure(figsize=(2.3 * cols, 2.5))
    axes = fig.subplots(1, cols)
    draw_observation(axes[0], x_obs, mask, geometry, locations_before, title="observed so far")
    art = draw_grid_heatmap(axes[1], x_obs, probs, geometry, mark=chosen, title=f"policy pi (max {float(probs.max()):.2f})")
    fig.colorbar(art, ax=axes[1], fraction=0.046, pad=0.02, format="%.2g").ax.tick_params(labelsize=6)
    if eig is not None:
        art = draw_grid_heatmap(axes[2], x_obs, eig, geometry, mark=int(eig.argmax()),
                                title=f"EIG-IPA (max {float(eig.max()):.3g} nats)")
        fig.colorbar(art, ax=axes[2], fraction=0.046, pad=0.02, format="%.2g").ax.tick_params(labelsize=6)
    draw_observation(axes[-1], x_after, mask_after, geometry, list(locations_before) + [int(chosen)], title="after the scan")
    if title:
        fig.suptitle(title, fontsize=9)
    _save(fig, path, dpi)


def run_policy(args, policy_dir: str, avp, ipa, x: torch.Tensor, labels, source: str, illness, device,
               first_sampler=None) -> int:
    """The scan loop of `boed run --policy` (``x`` uint8 (1, C, S, S); ``ipa`` may be None: no EIG maps)."""
    S = avp.config.image_size
    geometry = ScanGeometry(S)
    policy = load_policy(policy_dir, illness, geometry, device)
    out = scan_out_dir(args.out or Path("runs") / f"scan-{illness.slug}-{source}-{policy.name}", getattr(args, "data_root", None))
    greedy = None
    if ipa is not None:
        greedy = GreedyPolicy(avp, IPASampler(ipa, temperature=args.temperature), illness, geometry,
                              n_samples=args.n_samples, first_sampler=first_sampler, chunk_size=args.chunk_size, device=device)
    generator = torch.Generator().manual_seed(args.seed)

    def decide(t: int, state) -> Decision:
        t0 = time.perf_counter()
        pi = policy.probs(state)[0]  # (L,)
        loc = int(policy.next_locations(state, generator)[0])
        seconds = time.perf_counter() - t0
        eig = None
        if greedy is not None:
            use = first_sampler if (t == 1 and first_sampler is not None) else None
            eig = greedy.score(state, generator, sampler=use).eig[0].cpu()  # (L,)
        row, col = divmod(loc, geometry.grid)

        def plot(path, state, new):
            plot_policy_step(path, geometry, state.x_obs[0], state.mask[0], pi, loc, new.x_obs[0], new.mask[0],
                             state.locations[0], eig,
                             title=f"{illness.name}, scan {t} by {policy.name}: location {loc} (row {row}, col {col})")

        return Decision(loc, fields=dict(pi=float(pi[loc]), eig=None if eig is None else float(eig[loc]),
                                         eig_argmax=None if eig is None else int(eig.argmax())),
                        text=f"pi {float(pi[loc]):.3f}"
                        + ("" if eig is None else f"  EIG {float(eig[loc]):.4g} nats (EIG-IPA's best: {int(eig.argmax())})"),
                        after=f"  decision {1000 * seconds:.1f} ms", value=float(pi[loc]) if eig is None else float(eig[loc]),
                        plot=plot, seconds=seconds)

    result = scan_image(x, labels, avp, illness, geometry, args.scans, decide, None if args.no_figures else out, device,
                        source, f"{policy.name} policy from {policy_dir}", models=f"the model files {policy_dir}, {args.avp}")
    probs, steps, target, state = result.probs, result.steps, result.target, result.state
    atomic_write_json(out / "scans.json", dict(illness=illness.name, source=source, target=target, policy=str(policy_dir),
                                               method=policy.name, seed=args.seed, geometry=geometry.to_dict(),
                                               prob_before=probs[0], steps=steps, locations=state.locations[0]))
    print(f"wrote {out / 'scans.json'}" + ("" if args.no_figures else f", {out}/step_*.png and {out / 'summary.png'}"))
    return 0

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
from boed.heatmaps import _save, draw_grid_heatmap, draw_observation, plot_summary, scan_out_dir
from boed.policies import GreedyPolicy, scan_start
from boed.samplers import IPASampler
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
    S, C = avp.config.image_size, avp.config.in_channels
    geometry = ScanGeometry(S)
    policy = load_policy(policy_dir, illness, geometry, device)
    out = scan_out_dir(args.out or Path("runs") / f"scan-{illness.slug}-{source}-{policy.name}", getattr(args, "data_root", None))
    greedy = None
    if ipa is not None:
        greedy = GreedyPolicy(avp, IPASampler(ipa, temperature=args.temperature), illness, geometry,
                              n_samples=args.n_samples, first_sampler=first_sampler, chunk_size=args.chunk_size, device=device)
    generator = torch.Generator().manual_seed(args.seed)

    prob, state, target = scan_start(avp, illness, labels, C, S, device)
    probs, steps = [prob(state)], []
    print(f"{illness.name} on {source}: {policy.name} policy from {policy_dir}"
          + ("" if target is None else f" (label: {int(target)})"))
    for t in range(1, args.scans + 1):
        t0 = time.perf_counter()
        pi = policy.probs(state)[0]  # (L,)
        loc = int(policy.next_locations(state, generator)[0])
        seconds = time.perf_counter() - t0
        eig = None
        if greedy is not None:
            use = first_sampler if (t == 1 and first_sampler is not None) else None
            eig = greedy.score(state, generator, sampler=use).eig[0].cpu()  # (L,)
        new = state.scan(x, torch.tensor([loc]), geometry)
        probs.append(prob(new))
        row, col = divmod(loc, geometry.grid)
        steps.append(dict(t=t, location=loc, row=row, col=col, box=list(geometry.box(loc)), pi=float(pi[loc]),
                          eig=None if eig is None else float(eig[loc]),
                          eig_argmax=None if eig is None else int(eig.argmax()), prob=probs[-1], seconds=seconds))
        print(f"t={t}  location {loc:3d} (row {row:2d}, col {col:2d})  pi {float(pi[loc]):.3f}"
              + ("" if eig is None else f"  EIG {float(eig[loc]):.4g} nats (EIG-IPA's best: {int(eig.argmax())})")
              + f"  p({illness.name}) = {probs[-1]:.3f}  decision {1000 * seconds:.1f} ms")
        if not args.no_figures:
            plot_policy_step(out / f"step_{t}.png", geometry, state.x_obs[0], state.mask[0], pi, loc, new.x_obs[0],
                             new.mask[0], state.locations[0], eig,
                             title=f"{illness.name}, scan {t} by {policy.name}: location {loc} (row {row}, col {col})")
        state = new
    if not args.no_figures:
        plot_summary(out / "summary.png", geometry, x[0], state.x_obs[0], state.mask[0], state.locations[0], probs,
                     [s["eig"] if s["eig"] is not None else s["pi"] for s in steps], illness.name, target)
    atomic_write_json(out / "scans.json", dict(illness=illness.name, source=source, target=target, policy=str(policy_dir),
                                               method=policy.name, seed=args.seed, geometry=geometry.to_dict(),
                                               prob_before=probs[0], steps=steps, locations=state.locations[0]))
    print(f"wrote {out / 'scans.json'}" + ("" if args.no_figures else f", {out}/step_*.png and {out / 'summary.png'}"))
    return 0

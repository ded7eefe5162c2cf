"""Where the time of one training step goes (not a test): ResNet-32 at batch 128, one run and K fused runs.

Times the step variants below on synthetic data already on the device, then prints the top CUDA kernels of
the fused bf16 step. Each variant is independent: one that fails prints its error and the others go on.

    python benchmarks/profile_step.py --device cuda --runs 8
    python benchmarks/profile_step.py --device cpu --runs 4 --backbone small_cnn --size 28 --channels 1
"""

# ruff: noqa: B023, E501  (the step closures are timed inside the iteration that defines them)
from __future__ import annotations

import argparse
import copy
import time
import types
from collections.abc import Callable

import torch
import torch.nn.functional as F

import ibcore
from ibcore.engine.steps.fused import CapturedStep, _Group


def build_models(k: int, backbone: str, channels_last: bool, device: torch.device) -> list[torch.nn.Module]:
    context = ibcore.BuildContext(num_classes=10, class_counts=tuple([100] * 10))
    torch.manual_seed(0)
    models = [ibcore.build("backbone", backbone, {}, context=context).to(device) for _ in range(k)]
    if channels_last:
        models = [m.to(memory_format=torch.channels_last) for m in models]
    return [m.train() for m in models]


def sgd(model: torch.nn.Module) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4)


def make_group(k: int, backbone: str, channels_last: bool, device: torch.device, stacked_norm: bool) -> _Group:
    runs = [
        types.SimpleNamespace(model=m, optimizer=sgd(m), name=str(i), loss=None, mixer=None, specs=None)
        for i, m in enumerate(build_models(k, backbone, channels_last, device))
    ]
    group = _Group(runs)  # type: ignore[arg-type]
    if not stacked_norm:  # vmap's own BatchNorm rule, for comparison
        group.skeleton = copy.deepcopy(runs[0].model).to("meta").train()
    group.load_lrs()
    return group


def capture(step: Callable[[], torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> CapturedStep:
    """Warm the step up on a side stream, then capture it as the engine does (static x and y)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    return CapturedStep(lambda *_: step(), (x, y))


def timed(name: str, step: Callable[[], None], device: torch.device, steps: int, images: int) -> float | None:
    try:
        for _ in range(5):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - started) / steps
    except Exception as exc:  # a diagnostic: report and go on
        print(f"{name:58s} FAILED: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
        return None
    print(f"{name:58s} {seconds * 1e3:8.2f} ms/step  {images / seconds:9.0f} images x runs/s", flush=True)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--backbone", default="resnet32")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--all-formats", action="store_true", help="also contiguous bf16 and fp32 variants")
    parser.add_argument("--no-profile", action="store_true", help="skip the kernel table")
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
        print(torch.cuda.get_device_name(device), torch.__version__)
    k, batch = args.runs, 128
    x = torch.randn(batch, args.channels, args.size, args.size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    formats = ((True, True), (True, False), (False, False)) if args.all_formats else ((True, True),)
    for bf16, channels_last in formats:
        tag = f"{'bf16' if bf16 else 'fp32'}{', channels_last' if channels_last else ''}"
        autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=False)  # noqa: E731
        xin = x.contiguous(memory_format=torch.channels_last) if channels_last else x

        (model,) = build_models(1, args.backbone, channels_last, device)
        optimizer = sgd(model)

        def one_step() -> None:
            with autocast():
                loss = F.cross_entropy(model(xin).float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        timed(f"1 run, eager, {tag}", one_step, device, args.steps, batch)

        for stacked_norm in (False, True):
            group = make_group(k, args.backbone, channels_last, device, stacked_norm)

            def fused_step() -> torch.Tensor:
                with autocast():
                    logits = group.forward(xin, shared=True).float()
                losses = torch.stack([F.cross_entropy(logits[i], y) for i in range(k)])
                losses.sum().backward()
                group.update()
                return losses.detach()

            norm = "stacked BatchNorm" if stacked_norm else "vmap's BatchNorm"
            timed(f"{k} runs fused, eager, {norm}, {tag}", fused_step, device, args.steps, batch * k)
            if cuda:
                try:
                    captured = capture(fused_step, xin, y)
                    timed(
                        f"{k} runs fused, CUDA graph, {norm}, {tag}",
                        captured.graph.replay,
                        device,
                        args.steps,
                        batch * k,
                    )
                except Exception as exc:
                    print(f"{k} runs fused, CUDA graph, {norm}, {tag}: FAILED {type(exc).__name__}: {str(exc)[:200]}")

        if cuda:
            # The whole step of one plain model captured in a CUDA graph: what launch overhead costs.
            (graph_model,) = build_models(1, args.backbone, channels_last, device)
            graph_optimizer = sgd(graph_model)

            def plain_step() -> torch.Tensor:
                graph_optimizer.zero_grad(set_to_none=True)
                with autocast():
                    loss = F.cross_entropy(graph_model(xin).float(), y)
                loss.backward()
                graph_optimizer.step()
                return loss.detach()

            try:
                captured = capture(plain_step, xin, y)
                timed(f"1 run, CUDA graph, {tag}", captured.graph.replay, device, args.steps, batch)
            except Exception as exc:
                print(f"1 run, CUDA graph, {tag}: FAILED {type(exc).__name__}: {str(exc)[:200]}")

    if cuda and not args.no_profile:
        from torch.profiler import ProfilerActivity, profile

        group = make_group(k, args.backbone, True, device, stacked_norm=True)
        xin = x.contiguous(memory_format=torch.channels_last)

        def profiled_step() -> None:
            with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
                logits = group.forward(xin, shared=True).float()
            sum(F.cross_entropy(logits[i], y) for i in range(k)).backward()
            group.update()

        for _ in range(5):
            profiled_step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                profiled_step()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))


if __name__ == "__main__":
    main()

"""`vla-steer discover` (concept neurons -> directions) and `vla-steer paper-dict` (the paper's YAML)."""

from __future__ import annotations

from pathlib import Path

from vla_steer.app.cli.args import add_policy_argument, parse_layers, parse_size


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "discover",
        help="find concept neurons of a model and save them as directions",
        description="Project every FFN value vector onto the vocabulary (cached as a neuron index), "
        "score neurons against concept lexicons (or cluster them by meaning), and save one direction per pole. "
        "Examples: vla-steer discover policies/demo/weights; vla-steer discover /ckpt/openvla-7b --layers 15-31; "
        "vla-steer discover lerobot/pi0_libero --kind pi0.",
    )
    add_policy_argument(p, positional=True)
    p.add_argument(
        "--out",
        type=Path,
        default=Path("directions"),
        help="where directions are written (default: ./directions)",
    )
    p.add_argument("--index-dir", type=Path, help="neuron index cache (default: OUT/index)")
    p.add_argument(
        "--concepts", type=Path, default=None, help="lexicon directory (default: the shipped concepts)"
    )
    p.add_argument("--poles", help="comma-separated poles to discover (default: all in the lexicons)")
    p.add_argument("--method", choices=("lexicon", "clusters"), default="lexicon")
    p.add_argument("--k", type=int, default=20, help="top/bottom tokens kept per neuron (default 20)")
    p.add_argument("--rank-by", choices=("logit", "cosine"), default="logit")
    p.add_argument(
        "--layers", type=parse_layers, help="inclusive layer range to choose neurons from, e.g. 15-31"
    )
    p.add_argument("--size", type=int, default=16, help="neurons per direction (default 16)")
    p.add_argument("--min-score", type=float, default=0.5)
    p.add_argument(
        "--memory-budget", type=parse_size, default=parse_size("1GiB"), help="extra memory for the projection"
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        help="weights' dtype (default: float32; a policy config's own dtype wins unless this is given)",
    )
    p.add_argument(
        "--lora", type=Path, help="PEFT LoRA adapter directory to merge before projecting (language models)"
    )
    p.add_argument(
        "--action-bins",
        type=int,
        help="language models: top N tokenizer ids are OpenVLA action bins (default: config's n_action_bins)",
    )
    p.set_defaults(func=cmd_discover)

    p = sub.add_parser("paper-dict", help="import or export the paper repo's dictionaries.yaml")
    ps = p.add_subparsers(dest="action", required=True)
    imp = ps.add_parser("import", help="paper YAML -> direction files")
    imp.add_argument("yaml", type=Path)
    imp.add_argument("--d-mlp", type=int, required=True, help="neurons per layer (OpenVLA: 11008)")
    imp.add_argument("--out", type=Path, default=Path("directions"))
    imp.add_argument("--names", help="comma-separated dictionary names (default: all)")
    exp = ps.add_parser("export", help="direction files -> paper YAML")
    exp.add_argument("directions", type=Path, help="directory of direction JSON files")
    exp.add_argument("--d-mlp", type=int, required=True)
    exp.add_argument("--out", type=Path, required=True)
    exp.add_argument("--drop-negative", action="store_true", help="leave out neurons of negative polarity")
    p.set_defaults(func=cmd_paper_dict)


def cmd_discover(args) -> int:
    from policies.resolve import LanguageModel, check_layers_and_size, resolve_target, stack_dims
    from vla_steer.core.config import shipped
    from vla_steer.core.discovery import discover, format_direction, load_lexicons

    # Everything that can be checked before the weights load is checked first.
    model_device = (
        "cuda" if args.device == "auto" and _cuda() else ("cpu" if args.device == "auto" else args.device)
    )
    target = resolve_target(
        args.policy, kind=args.kind, flag="POLICY", settings=dict(args.option), device=model_device,
        dtype=args.dtype,
    )  # fmt: skip
    if not isinstance(target, LanguageModel):
        for flag, value in (("--lora", args.lora), ("--action-bins", args.action_bins)):
            if value is not None:
                raise ValueError(
                    f"{flag} applies to plain language models; {args.policy} is a {target.kind} policy"
                )
    dims = stack_dims(target)
    if dims is not None:
        check_layers_and_size(dims["language"], args.layers, args.size, f"{args.policy}'s language model")
    if args.k < 1:
        raise ValueError(f"--k {args.k}: keep at least one token per neuron")
    poles = load_lexicons(args.concepts or shipped("concepts"))
    if args.poles:
        wanted = [p.strip() for p in args.poles.split(",") if p.strip()]
        unknown = [p for p in wanted if p not in poles]
        if unknown:
            raise ValueError(f"--poles: unknown poles {unknown}; the lexicons define {sorted(poles)}")
        poles = {p: poles[p] for p in wanted}

    backbones = _load_backbones(target, args)
    backbone = backbones["language"]
    print(f"{backbone.name}: {backbone.n_layers} layers x {backbone.d_mlp} neurons, vocab {backbone.vocab_size} "
          f"(fingerprint {backbone.fingerprint()})")  # fmt: skip
    print(_stacks_line(target.kind, backbones))
    if args.layers is not None:  # a hub checkpoint's sizes are known only now
        check_layers_and_size((backbone.n_layers, backbone.d_mlp), args.layers, args.size, backbone.name)
    directions = discover(
        backbone,
        poles,
        index_dir=args.index_dir or args.out / "index",
        method=args.method,
        k=args.k,
        rank_by=args.rank_by,
        layers=args.layers,
        size=args.size,
        min_score=args.min_score,
        memory_budget=args.memory_budget,
        device=args.device,
    )
    found = {name: d for name, d in directions.items() if d.neurons}
    for d in found.values():
        d.provenance["backbone"] = "language"  # which of the policy's stacks the node steers with it
        print()
        print(format_direction(d))
        d.save(args.out)
    for name in sorted(set(directions) - set(found)):
        print(f"\n{name}: no neuron scored >= --min-score {args.min_score}; not written")
    if not found:
        raise ValueError(
            f"no neuron of {backbone.name} matched any pole: lower --min-score, widen --layers, or try "
            "--method clusters"
        )
    print(f"\nwrote {len(found)} directions to {args.out}/")
    return 0


def _load_backbones(target, args) -> dict:
    """Every steerable stack of the target by name ("language" first), loaded once."""
    from policies.resolve import LanguageModel

    if isinstance(target, LanguageModel):
        from vla_steer.core.loading import load_backbone

        bb = load_backbone(target.path, dtype=target.dtype, device=target.device, lora=args.lora,
                           action_bins=args.action_bins)  # fmt: skip
        return {"language": bb}
    from policies import load_policy

    if target.kind == "openvla" and target.unnorm_key is None:
        target = _any_unnorm_key(target)
    return load_policy(target).backbones


def _any_unnorm_key(target):
    """Discovery never decodes actions, so any dataset's statistics will do (loading needs one)."""
    from policies.openvla import PrismaticConfig, processing
    from policies.openvla.policy import resolve_checkpoint

    directory = resolve_checkpoint(target.path)
    keys = sorted(processing.load_norm_stats(directory, PrismaticConfig.from_file(directory / "config.json")))
    return target.model_copy(update={"path": directory, "unnorm_key": keys[0] if keys else None})


def _stacks_line(kind: str, backbones: dict) -> str:
    """Which steerable stacks the policy has and which this command used."""
    lines = [f"steerable stacks of this {kind}:"]
    for key, bb in backbones.items():
        size = f"{bb.n_layers} layers x {bb.d_mlp} neurons"
        if key == "language":
            lines.append(f"  {key} ({size}): vocabulary projection -- used here")
        else:
            lines.append(
                f"  {key} ({size}): no vocabulary, so no projection; find its directions by contrast "
                "(vla_steer.core.discovery.contrast.contrast_directions(policy.backbones['" + key + "'], "
                f"run, positive_observations, negative_observations, name=..., backbone_key='{key}')) -- not used"
            )
    return "\n".join(lines)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def cmd_paper_dict(args) -> int:
    from vla_steer.core.discovery.direction import export_paper_yaml, import_paper_yaml, load_directions

    if args.action == "import":
        names = [n.strip() for n in args.names.split(",")] if args.names else None
        directions = import_paper_yaml(args.yaml, args.d_mlp, names=names)
        for d in directions.values():
            d.save(args.out)
        print(f"imported {len(directions)} dictionaries into {args.out}/: {', '.join(directions)}")
    else:
        directions = list(load_directions(args.directions).values())
        export_paper_yaml(directions, args.d_mlp, args.out, drop_negative=args.drop_negative)
        print(f"exported {len(directions)} directions to {args.out}")
    return 0

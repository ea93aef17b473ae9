"""``sppo-lightning export``: a checkpoint's policy (or J-BOND's anchor) in Hugging Face format."""

from __future__ import annotations

import argparse

import lightning as L

from sppo_lightning.errors import ConfigError
from sppo_lightning.models import export_hf, load_tokenizer
from sppo_lightning.module import PreferenceModule


def export_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="sppo-lightning export",
        description="Save a checkpoint's policy in Hugging Face format (LoRA merged, safetensors).",
    )
    parser.add_argument("checkpoint", help="a .ckpt written by `sppo-lightning fit`, or a sharded checkpoint "
                                           "folder of the fsdp footprint")
    parser.add_argument("out_dir", help="folder for config.json, model.safetensors and the tokenizer")
    parser.add_argument("--anchor", action="store_true",
                        help="a J-BOND checkpoint: export the EMA anchor instead of the policy")
    args = parser.parse_args(argv)
    from pathlib import Path

    if Path(args.out_dir).exists() and not Path(args.out_dir).is_dir():
        raise ConfigError(f"{args.out_dir} is a file, not a folder: give export a folder to write the model into")
    module = _load_for_export(args.checkpoint)
    tokenizer = load_tokenizer(module.hparams.model_name_or_path, module.hparams.trust_remote_code)
    from sppo_lightning.bond import ANCHOR, BondModule

    if args.anchor and not isinstance(module, BondModule):
        raise ConfigError(f"{args.checkpoint} is a {type(module).__name__} checkpoint: --anchor exports the EMA "
                          f"anchor of a J-BOND (BondModule) checkpoint")
    what = "policy"
    if args.anchor and module.lora is not None:  # the anchor is the second adapter on the policy's base
        out, what = export_hf(module.policy, tokenizer, args.out_dir, adapter=ANCHOR), "J-BOND anchor"
    elif args.anchor:
        out, what = export_hf(module.anchor, tokenizer, args.out_dir), "J-BOND anchor"
    else:
        out = export_hf(module.policy, tokenizer, args.out_dir)
    print(f"Exported the {what} in Hugging Face format to {out}")


def _load_for_export(checkpoint: str) -> L.LightningModule:
    """The module of a ``.ckpt`` file (``PreferenceModule`` or J-BOND's ``BondModule``), or of a sharded
    checkpoint folder (footprint ``fsdp``), unsharded on CPU and without a reference model (export
    does not need one). A file that is not a checkpoint is one line."""
    import pickle
    from pathlib import Path

    import torch

    from sppo_lightning.checkpoints import verified

    path = Path(checkpoint)
    if not path.exists():
        raise ConfigError(f"no checkpoint at {checkpoint}")
    if path.is_file() and not verified(path):
        raise ConfigError(f"{checkpoint} is not a checkpoint (not a whole torch archive: torn, or another kind of "
                          f"file); export takes a .ckpt written by `sppo-lightning fit` or a sharded checkpoint folder")
    if path.is_dir():
        from lightning.fabric.utilities.load import _load_distributed_checkpoint

        from sppo_lightning.checkpoints import check_dcp_metadata

        check_dcp_metadata(path)  # before torch's reader unpickles it
        full = _load_distributed_checkpoint(path)
        hparams = dict(full["hyper_parameters"])
        hparams["reference"] = _export_reference(hparams)
        hparams["footprint"] = "lora" if hparams.get("lora") else "full"
        module = PreferenceModule(**hparams)
        module.configure_model()
        state = {k: v for k, v in full["state_dict"].items() if not k.startswith("reference.")}
        module.load_state_dict(state, strict=True)  # a sharded checkpoint holds every weight
        return module
    try:
        hparams = torch.load(checkpoint, map_location="cpu", weights_only=True).get("hyper_parameters")
    except (pickle.UnpicklingError, RuntimeError, KeyError, AttributeError, EOFError) as err:
        raise ConfigError(f"{checkpoint} cannot be read as a checkpoint ({' '.join(str(err).split())[:200]})") from None
    if not isinstance(hparams, dict):
        raise ConfigError(f"{checkpoint} holds no hyper_parameters: not a checkpoint written by `sppo-lightning fit`")
    if hparams.get("_class_path") == "sppo_lightning.bond.BondModule" or "jeffreys_beta" in hparams:
        from sppo_lightning.bond import BondModule

        return BondModule.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True)
    reference = _export_reference(hparams)
    return PreferenceModule.load_from_checkpoint(checkpoint, map_location="cpu", reference=reference, weights_only=True)


def _export_reference(hparams: dict) -> str:
    """Export needs no reference model: none for reference-free losses, else cached (never loaded)."""
    from sppo_lightning.loss_table import needs_reference

    return "cached" if needs_reference(hparams.get("loss", "sppo")) else "none"


# Lines of jsonargparse's nested Union reports that say nothing about the actual mistake.

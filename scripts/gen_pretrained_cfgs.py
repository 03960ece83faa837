"""Write fastvit/pretrained_cfgs.json: timm's pretrained configs for every architecture fastvit registers.

Where the values come from: the installed timm's registry, which builds them from the ``default_cfgs`` tables of
``timm/models/vision_transformer.py`` and ``timm/models/vision_transformer_hybrid.py`` (read through
``timm.models.get_arch_pretrained_cfgs``, tags in timm's priority order, the default first); the timm version is
recorded in the file. ``defaults`` holds timm's ``PretrainedCfg()`` fields, used for names registered without
configs. Run after adding a registered name or upgrading timm:

    python scripts/gen_pretrained_cfgs.py
"""
import json
import pathlib

OUT = pathlib.Path(__file__).resolve().parents[1] / "fastvit" / "pretrained_cfgs.json"


def build_table():
    """The file's content as a dict: timm's configs per tag for each name in ``fastvit.list_models()``."""
    import timm
    from timm.models import PretrainedCfg, get_arch_pretrained_cfgs

    import fastvit

    models = {}
    for arch in fastvit.list_models():
        cfgs = get_arch_pretrained_cfgs(arch)
        if not cfgs:
            raise ValueError(f"timm {timm.__version__} has no pretrained configs for {arch}")
        tags = [name.partition(".")[2] for name in cfgs]
        models[arch] = {"tags": tags, "cfgs": {tag: cfg.to_dict() for tag, cfg in zip(tags, cfgs.values())}}
    return {
        "source": "timm's registered default_cfgs (timm/models/vision_transformer.py, vision_transformer_hybrid.py), "
                  "written by scripts/gen_pretrained_cfgs.py",
        "timm_version": timm.__version__,
        "defaults": PretrainedCfg().to_dict(),
        "models": models,
    }


def render(table):
    return json.dumps(table, indent=1) + "\n"


if __name__ == "__main__":
    OUT.write_text(render(build_table()), encoding="utf-8")
    print(f"wrote {OUT}")

"""The config name of one stage of a config family, shared by the pipeline's steps and `bagel submit`."""


def stage_config_name(configs: str, stage: str) -> str:
    """Return the config of `stage`: `{configs}/{stage}.yaml` for a directory path, else the packaged `{configs}/{stage}`."""
    return f"{configs}/{stage}.yaml" if configs.startswith(("/", ".")) else f"{configs}/{stage}"

"""How much the demo runs by default and under `--full`: light, so the CLI's help can state it without
importing the demo (torch, robosuite)."""

STRENGTHS = (16.0, 32.0)  # the dose ladder; the largest is the reported strength, where the controls run
CONTROLS = 3  # random-control draws per direction
EPISODES = 20  # per setting
WORKERS = 4  # robosuite processes sharing the policy node: on 2 cores, sims step while a batch is decoded
FULL = dict(strengths=(8.0, 16.0, 24.0, 32.0, 40.0), controls=5, episodes=30)  # `--full`


def floats(values) -> str:
    """`16,32` for the help text: the form `--strengths` takes."""
    return ",".join(f"{v:g}" for v in values)

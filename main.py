"""`python main.py --config configs/X.py[:variant] --workdir DIR [--config.key=value ...]`: onepfrac_jax.main."""

from onepfrac_jax.main import cli

if __name__ == "__main__":
    cli()

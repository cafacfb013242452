"""The stages, one module each: validate → loop.prepare → set-up → run.train(task) → Result; main.py runs them."""

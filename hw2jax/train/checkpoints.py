"""orbax-checkpoint managers for the latest state (resume) and the best params (evaluation).

orbax writes each checkpoint into a temporary folder and renames it when complete, so an
interrupted save never leaves a half-written checkpoint behind. Saves are asynchronous: orbax
copies the arrays to host memory before ``save`` returns (so the train step may donate their
buffers at once) and writes the files in a background thread while training goes on. ``wait``
(or ``close``) blocks until they are on disk. With several processes (jax.distributed) each save
is waited for at once: two background saves in flight there deadlocked orbax in our 2-process test.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


def _abstract(tree: Any) -> Any:
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class Checkpoints:
    def __init__(self, directory: str | Path):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True)
        self._latest = ocp.CheckpointManager(self.directory / "latest", options=options)
        self._best = ocp.CheckpointManager(self.directory / "best", options=options)

    @staticmethod
    def _payload(state) -> dict[str, Any]:
        return {"step": state.step, "params": state.params, "opt_state": state.opt_state}

    def latest_step(self) -> int | None:
        return self._latest.latest_step()

    def save_latest(self, state) -> None:
        step = int(state.step)
        if self._latest.latest_step() != step:
            self._latest.save(step, args=ocp.args.StandardSave(self._payload(state)))
            self._wait_if_distributed()

    def save_best(self, state, metrics: dict[str, float]) -> None:
        payload = {"step": state.step, "params": state.params}
        self._best.save(
            int(state.step),
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(payload), metrics=ocp.args.JsonSave(metrics)
            ),
        )
        self._wait_if_distributed()

    def _wait_if_distributed(self) -> None:
        if jax.process_count() > 1:
            self.wait()

    def wait(self) -> None:
        """Blocks until every save started so far is complete on disk."""
        self._latest.wait_until_finished()
        self._best.wait_until_finished()

    def restore_latest(self, state):
        """``state`` with the latest checkpoint's values, or unchanged when there is none."""
        self.wait()
        step = self._latest.latest_step()
        if step is None:
            return state
        restored = self._latest.restore(
            step, args=ocp.args.StandardRestore(_abstract(self._payload(state)))
        )
        return state.replace(**restored)

    def restore_best_params(self, params_like: Any) -> tuple[Any, dict[str, float]]:
        """The best params and their metrics; falls back to the latest checkpoint."""
        self.wait()
        step = self._best.latest_step()
        if step is not None:
            target = {"step": 0, "params": _abstract(params_like)}
            out = self._best.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target), metrics=ocp.args.JsonRestore()
                ),
            )
            return out.state["params"], dict(out.metrics)
        step = self._latest.latest_step()
        if step is None:
            raise FileNotFoundError(
                f"no checkpoint in {self.directory}; train first with the same --workdir."
            )
        out = self._latest.restore(step, args=ocp.args.StandardRestore())
        return out["params"], {"step": step}

    def close(self) -> None:
        self._latest.close()
        self._best.close()

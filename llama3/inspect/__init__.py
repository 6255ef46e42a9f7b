"""See inside a Llama model with real tensors.  Every view watches one ordinary forward pass
through hooks (capture.py), so a model nobody is inspecting runs exactly as before.

    trace(llm, prompt, layer=None)      every step, shapes with named dims, statistics   (trace.py)
    attention_maps / plot_attention     attention weights as heatmaps                    (attention.py)
    logit_lens / plot_logit_lens        the top next token read after every layer        (logit_lens.py)
    render_rope / plot_rope             RoPE frequencies, with and without scaling       (rope.py)
    explain_answer(llm, prompt, answer) why the model answered that                      (explain.py)
    diagnose / compare_with_transformers  the checkpoint doctor                          (doctor.py)
    write_walkthrough(out)              docs/walkthrough.md and .zh.md                   (walkthrough.py)
    patch(llm, clean, corrupted)        activation patching: what restores the answer    (patching.py)
    ablate(llm, prompt, heads, blocks)  switch heads or blocks off, see the new top      (patching.py)
    attribute(llm, prompt, target)      token attribution: IG and gradient x input       (attribution.py)

Each takes an `llama3.LLM` (model + tokenizer) and a prompt given as text or token ids.
"""

from llama3.inspect.attention import attention_maps, plot_attention
from llama3.inspect.attribution import attribute, plot_attribution
from llama3.inspect.capture import Capture, capture
from llama3.inspect.explain import explain_answer
from llama3.inspect.logit_lens import logit_lens, plot_logit_lens
from llama3.inspect.patching import ablate, patch, plot_patching
from llama3.inspect.rope import plot_rope, render_rope
from llama3.inspect.trace import trace

__all__ = ["Capture", "capture", "trace", "attention_maps", "plot_attention", "logit_lens", "plot_logit_lens",
           "render_rope", "plot_rope", "explain_answer", "patch", "plot_patching", "ablate", "attribute",
           "plot_attribution"]

"""The command lines, on top of the trainer: ``train.py`` (:mod:`jaxattn.commands.train`),
``python -m jaxattn.commands.generate`` (answer prompts with a trained run) and
``python -m jaxattn.commands.viz`` (draw a run's pictures). Each ends the same way
(:func:`jaxattn.commands._ending.run_command`): a result on stdout, or one line on stderr and
a non-zero status."""

from jaxattn.commands._compile_cache import add_compile_cache_flag as add_compile_cache_flag
from jaxattn.commands._compile_cache import use_compile_cache as use_compile_cache

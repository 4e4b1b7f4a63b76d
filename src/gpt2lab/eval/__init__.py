"""Evaluation: HellaSwag, loss over a prepared split, WikiText-2 and LAMBADA; one module per benchmark.

- ``hellaswag.evaluate_hellaswag(model, tokenizer, examples, device, ...)``: also called by training;
- ``loss.evaluate_loss``, ``wikitext.evaluate_ids``, ``lambada.evaluate_lambada``;
- ``common.score_pairs``: the batched (context, continuation) scorer they share;
- ``generative.evaluate(model, tokenizer, task, split, samples, limit)``: GSM8K / arith answers written and graded;
- ``commands.eval_command``: the ``gpt2lab eval`` subcommands.
Each module's docstring states its expected results.
"""

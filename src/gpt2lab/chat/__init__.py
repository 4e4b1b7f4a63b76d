"""From language model to chatbot: the chat format (template), SFT data (sft_data, sft) and the terminal chat."""

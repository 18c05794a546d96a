"""Hugging Face transformers/TRL integration: a TrainerCallback and a classifying collator."""

"""Generic methods that adapt any registered host: ``lora`` (through peft) and ``bitfit``."""

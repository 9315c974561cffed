"""Generic methods that adapt any registered host: ``lora`` (through peft) and ``bitfit``.

The folder is `generic`, not `methods`, so that importing it never shadows ``vp.methods()``.
"""

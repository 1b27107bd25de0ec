"""The student: its construction, one DeLoRA expert per operation, distillation losses, the DeepSpeed training
entry, and inference with all experts on one base."""

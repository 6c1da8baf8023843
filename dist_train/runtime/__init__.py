"""The platform under the loop: accelerator.py (the Accelerator and DDP settings),
accelerate_patches.py, host_memory.py, startup_clock.py, preemption.py (stop signals), seeds.py."""

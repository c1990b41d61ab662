"""Myrtle kernels: the exact analytic recursion and the random-network estimate."""

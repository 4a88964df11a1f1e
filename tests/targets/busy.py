"""A CPU-bound pure-Python workload, for unwinding tests and demos.

    python3 busy.py SECONDS

Prints a ready line, then spends its time in two Python functions (a
recursive one and a generator-heavy one), all in the interpreter loop.
"""
import sys
import time


def fib(n):
    return n if n < 2 else fib(n - 1) + fib(n - 2)


def squares():
    total = 0
    for i in range(2_000):
        total += sum(j * j for j in range(200))
    return total


def main():
    end = time.time() + float(sys.argv[1])
    print("busy.py ready", flush=True)
    while time.time() < end:
        fib(18)
        squares()


main()

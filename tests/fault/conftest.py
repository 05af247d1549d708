"""The fault tier: a real tritonserver per test file, fed bad input, broken adapters and
cancellations. Each file checks that the model is READY and the engine idle afterwards."""
import os
import sys

# e2e_helpers (servers, StreamClient, generate, metrics) lives beside the e2e tests
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "e2e"))

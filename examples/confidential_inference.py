"""Train on public data, then score sensitive records where the machine's operator cannot read them.

`train` fits a model on the public iris measurements, outside any TEE. `score` reads the sensitive records
and scores them inside a Gramine enclave (`@confidential`): its predictions are sealed before they leave
it, so the datastore holds only ciphertext. `summarise` reads those predictions in a second enclave
(`unsealed`) and publishes only an aggregate (`seal=False`). With `mode="sgx"` and a policy, each task's
results are trusted only after its enclave's quote passes the policy; `mode="direct"` (the default here)
runs the same enclaves without SGX, for development: it protects nothing (docs/confidential.md).

    python examples/confidential_inference.py run                     # gramine-direct
    CONFIDENTIAL_MODE=sgx python examples/confidential_inference.py run   # an SGX machine, with a policy
"""

import os

from metaflow import FlowSpec, Parameter, confidential, step

MODE = os.environ.get("CONFIDENTIAL_MODE", "direct")
POLICY = os.environ.get("CONFIDENTIAL_POLICY") if MODE == "sgx" else None
LOGISTIC_REGRESSION = "sklearn.linear_model._logistic.LogisticRegression"


class ConfidentialInferenceFlow(FlowSpec):
    """Public training, confidential scoring, a published aggregate."""

    patients = Parameter("patients", default=20, type=int, help="how many sensitive records to score")

    @step
    def start(self):
        self.next(self.train)

    @step
    def train(self):
        from sklearn.datasets import load_iris
        from sklearn.linear_model import LogisticRegression

        features, labels = load_iris(return_X_y=True)
        self.model = LogisticRegression(max_iter=500).fit(features, labels)
        self.next(self.score)

    # The model comes from outside the TEE, pickled: the enclave unpickles only the classes it trusts (numpy
    # arrays are always read).
    @confidential(mode=MODE, policy=POLICY, seal=True, enclave_size="2G", trust=[LOGISTIC_REGRESSION])
    @step
    def score(self):
        import random

        generator = random.Random(7)  # stands in for records read from a private store inside the enclave
        ranges = [(4, 8), (2, 4.5), (1, 7), (0.1, 2.5)]  # sepal and petal, length and width, in cm
        records = [[generator.uniform(low, high) for low, high in ranges] for _ in range(self.patients)]
        self.predictions = [int(label) for label in self.model.predict(records)]
        self.next(self.summarise)

    @confidential(mode=MODE, policy=POLICY, seal=False, enclave_size="2G")
    @step
    def summarise(self):
        from metaflow_stack.confidential import unsealed

        predictions = unsealed(self, "predictions")
        self.counts = {label: predictions.count(label) for label in sorted(set(predictions))}
        self.next(self.end)

    @step
    def end(self):
        print("predicted classes:", self.counts)


if __name__ == "__main__":
    ConfidentialInferenceFlow()

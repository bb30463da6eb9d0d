"""A real training flow: a scikit-learn classifier on the iris data it ships."""

from metaflow import FlowSpec, step


class IrisTrainFlow(FlowSpec):
    """Trains a logistic regression and keeps the feature names beside it."""

    @step
    def start(self):
        self.next(self.train)

    @step
    def train(self):
        from sklearn.datasets import load_iris
        from sklearn.linear_model import LogisticRegression

        iris = load_iris()
        self.feature_names = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
        self.model = LogisticRegression(max_iter=500).fit(iris.data, iris.target)
        self.accuracy = float(self.model.score(iris.data, iris.target))
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    IrisTrainFlow()

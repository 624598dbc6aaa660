"""A plugin evaluator (named in a grid's `evaluators:`): how many queries it was shown and how
many of their labelled pixels were predicted as the label says."""

from fsbench import register_evaluator
from fsbench.benchmarks.evaluation.evaluator import Evaluator
from fsbench.methods.base import labels_of


@register_evaluator("query_stats")
class QueryStats(Evaluator):
    def reset(self):
        self.queries, self.correct, self.labelled = 0, 0, 0

    def process(self, outputs, labels, refs):
        predicted = labels_of(outputs, self.output_kind)
        valid = labels != 255
        self.queries += len(refs)
        self.correct += int(((predicted == labels) & valid).sum())
        self.labelled += int(valid.sum())

    def result(self):
        return {"queries": self.queries, "pixel_accuracy": self.correct / max(self.labelled, 1)}

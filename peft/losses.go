package peft

import (
	"fmt"
	"sync"

	"github.com/gomlx/gomlx/pkg/core/graph"
	"github.com/gomlx/gomlx/pkg/core/shapes"
	"github.com/gomlx/gomlx/pkg/core/tensors"
	"github.com/gomlx/gomlx/pkg/ml/context"
	"github.com/gomlx/gomlx/pkg/ml/train/losses"
	"github.com/gomlx/gopjrt/dtypes"
)

// LossFn computes a scalar loss from labels and predictions; it is GoMLX's losses.LossFn.
type LossFn = losses.LossFn

// CrossEntropy is the classification loss: predictions[0] are logits [batch, classes], labels[0]
// the integer class of each example, shaped [batch] or [batch, 1]. It returns the mean negative
// log-likelihood.
func CrossEntropy(labels, predictions []*graph.Node) *graph.Node {
	logits := predictions[0]
	classes := labels[0]
	if classes.Rank() == logits.Rank() {
		classes = graph.Squeeze(classes, -1)
	}
	return graph.ReduceAllMean(tokenNLL(logits, classes))
}

// tokenNLL returns −log softmax(logits)[class] for each position: logits [..., C], classes [...].
func tokenNLL(logits, classes *graph.Node) *graph.Node {
	logProbs := graph.LogSoftmax(logits, -1)
	oneHot := graph.OneHot(classes, logits.Shape().Dim(-1), logProbs.DType())
	return graph.Neg(graph.ReduceSum(graph.Mul(logProbs, oneHot), -1))
}

// NextTokenLoss is the language-modelling loss: predictions[0] are logits [batch, seq, vocab],
// labels[0] the token ids [batch, seq] the model read, labels[1], optional, a padding mask
// [batch, seq] (true or non-zero for real tokens), and labels[2], optional, a loss mask [batch,
// seq] marking the tokens to learn (a completion, the assistant's turns; package data makes
// it). Position t is scored on predicting token t+1; the mean is over the pairs where both
// tokens are real and token t+1 is to be learnt. The number of pairs is recorded for the
// optimizer, so that gradient accumulation weighs each micro-batch by its tokens, as one batch
// of them all would.
func NextTokenLoss(labels, predictions []*graph.Node) *graph.Node {
	logits := predictions[0]
	ids := labels[0]
	batch, seq := ids.Shape().Dim(0), ids.Shape().Dim(1)
	g := ids.Graph()
	// Shift the labels, not the logits: labels carry no gradient, and slicing the logits would
	// need Slice's gradient, which the pure-Go backend lacks.
	pad := graph.Zeros(g, shapes.Make(ids.DType(), batch, 1))
	targets := graph.Concatenate([]*graph.Node{graph.SliceAxis(ids, 1, graph.AxisRange(1)), pad}, 1)
	valid := graph.Concatenate([]*graph.Node{
		graph.Ones(g, shapes.Make(dtypes.Bool, batch, seq-1)),
		graph.Zeros(g, shapes.Make(dtypes.Bool, batch, 1)),
	}, 1)
	if len(labels) > 1 && labels[1] != nil {
		mask := toBool(labels[1])
		next := graph.Concatenate([]*graph.Node{graph.SliceAxis(mask, 1, graph.AxisRange(1)), graph.Zeros(g, shapes.Make(dtypes.Bool, batch, 1))}, 1)
		valid = graph.LogicalAnd(valid, graph.LogicalAnd(mask, next))
	}
	if len(labels) > 2 && labels[2] != nil {
		learn := toBool(labels[2])
		next := graph.Concatenate([]*graph.Node{graph.SliceAxis(learn, 1, graph.AxisRange(1)), graph.Zeros(g, shapes.Make(dtypes.Bool, batch, 1))}, 1)
		valid = graph.LogicalAnd(valid, next)
	}
	nll := tokenNLL(logits, targets)
	weights := graph.ConvertDType(valid, nll.DType())
	pairs := graph.ReduceAllSum(weights)
	recordLossWeight(g, pairs)
	count := graph.Max(pairs, graph.ScalarOne(g, nll.DType()))
	return graph.Div(graph.ReduceAllSum(graph.Mul(nll, weights)), count)
}

// lossWeights holds, per graph, the weight of its batch in the loss (NextTokenLoss's number of
// scored pairs), which AdamW reads to accumulate gradients as one larger batch would.
var lossWeights sync.Map // *graph.Graph → *graph.Node

func recordLossWeight(g *graph.Graph, w *graph.Node) { lossWeights.Store(g, w) }

// takeLossWeight returns and forgets the weight recorded for g (nil if none).
func takeLossWeight(g *graph.Graph) *graph.Node {
	w, ok := lossWeights.LoadAndDelete(g)
	if !ok {
		return nil
	}
	return w.(*graph.Node)
}

func toBool(x *graph.Node) *graph.Node {
	if x.DType() == dtypes.Bool {
		return x
	}
	return graph.NotEqual(x, graph.ZerosLike(x))
}

// Task is one term of a multi-task loss: Loss applied to the labels and predictions at the given
// indices, weighted by Weight.
type Task struct {
	Name        string
	Weight      float64
	Loss        LossFn
	Labels      []int
	Predictions []int
}

// MultiTask returns the loss Σ weight·loss of the tasks. It is an error if a task has no loss,
// a negative weight, or no labels or predictions to read.
func MultiTask(tasks ...Task) (LossFn, error) {
	if len(tasks) == 0 {
		return nil, fmt.Errorf("peft.MultiTask: no tasks")
	}
	for i, t := range tasks {
		if t.Loss == nil || t.Weight < 0 || len(t.Labels) == 0 || len(t.Predictions) == 0 {
			return nil, fmt.Errorf("peft.MultiTask: task %d (%q) needs a loss, a weight ≥ 0 and label and prediction indices", i, t.Name)
		}
	}
	return func(labels, predictions []*graph.Node) *graph.Node {
		var total *graph.Node
		for _, t := range tasks {
			l := pick(labels, t.Labels)
			p := pick(predictions, t.Predictions)
			term := graph.MulScalar(t.Loss(l, p), t.Weight)
			if total == nil {
				total = term
			} else {
				total = graph.Add(total, term)
			}
		}
		takeLossWeight(total.Graph()) // a sum of task means has no one batch weight
		return total
	}, nil
}

func pick(nodes []*graph.Node, indices []int) []*graph.Node {
	out := make([]*graph.Node, len(indices))
	for i, idx := range indices {
		if idx < 0 || idx >= len(nodes) {
			panic(fmt.Sprintf("peft.MultiTask: index %d out of range (have %d)", idx, len(nodes)))
		}
		out[i] = nodes[idx]
	}
	return out
}

// L2Toward returns λ·Σ‖θ−θ₀‖² over the pairs (vars[i], anchors[i]): L2-SP regularization toward
// pretrained values. With anchors nil it is plain L2 (weight decay as a loss term), λ·Σ‖θ‖².
func L2Toward(g *graph.Graph, lambda float64, vars, anchors []*context.Variable) *graph.Node {
	total := graph.Scalar(g, dtypes.Float32, 0)
	for i, v := range vars {
		diff := v.ValueGraph(g)
		if anchors != nil {
			diff = graph.Sub(diff, graph.StopGradient(anchors[i].ValueGraph(g)))
		}
		sq := graph.ReduceAllSum(graph.Square(diff))
		if sq.DType() != dtypes.Float32 {
			sq = graph.ConvertDType(sq, dtypes.Float32)
		}
		total = graph.Add(total, sq)
	}
	return graph.MulScalar(total, lambda)
}

func zerosTensor(shape shapes.Shape) *tensors.Tensor { return tensors.FromShape(shape) }

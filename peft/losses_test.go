package peft_test

import (
	"math"
	"testing"

	"github.com/gomlx/gomlx/pkg/core/graph"
	"github.com/gomlx/gomlx/pkg/ml/context"
	"github.com/stretchr/testify/require"

	"peft/peft"
)

// logSumExp of a few numbers, in float64.
func logSumExp(xs ...float64) float64 {
	var s float64
	for _, x := range xs {
		s += math.Exp(x)
	}
	return math.Log(s)
}

func TestCrossEntropy(t *testing.T) {
	logits := [][]float32{{1, 2, 3}, {1, 1, 1}}
	// Row 0, class 2: log(e¹+e²+e³) − 3 = 0.4076060; row 1, class 0: log 3 = 1.0986123.
	want := (logSumExp(1, 2, 3) - 3 + math.Log(3)) / 2
	require.InDelta(t, 0.7531091265562448, want, 1e-12)
	for _, tc := range []struct {
		name   string
		labels any
	}{
		{"labels [b] int32", []int32{2, 0}},
		{"labels [b, 1] int32", [][]int32{{2}, {0}}},
		{"labels [b] int64", []int64{2, 0}},
		{"labels [b, 1] int64", [][]int64{{2}, {0}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := scalar(t, nil, func(_ *context.Context, g *graph.Graph) *graph.Node {
				return peft.CrossEntropy([]*graph.Node{graph.Const(g, tc.labels)}, []*graph.Node{graph.Const(g, logits)})
			})
			require.InDelta(t, want, got, 1e-6)
		})
	}
	// Other labels give another value: row 0 class 0 (log(e¹+e²+e³) − 1), row 1 class 2 (log 3).
	got := scalar(t, nil, func(_ *context.Context, g *graph.Graph) *graph.Node {
		return peft.CrossEntropy([]*graph.Node{graph.Const(g, []int32{0, 2})}, []*graph.Node{graph.Const(g, logits)})
	})
	require.InDelta(t, (logSumExp(1, 2, 3)-1+math.Log(3))/2, got, 1e-6)
}

func TestNextTokenLoss(t *testing.T) {
	// One sequence of 4 tokens over a vocabulary of 3: ids 0 2 1 2. Position t is scored on
	// token t+1: position 0 → 2, 1 → 1, 2 → 2; position 3 has no next token.
	logits := [][][]float32{{{0, 0, 0}, {1, 2, 3}, {2, 0, 0}, {5, 0, 0}}}
	ids := [][]int32{{0, 2, 1, 2}}
	nll := []float64{
		math.Log(3),            // position 0, token 2: 1.0986123
		logSumExp(1, 2, 3) - 2, // position 1, token 1: 1.4076060
		logSumExp(2, 0, 0) - 0, // position 2, token 2: 2.2395448
		logSumExp(5, 0, 0) - 0, // position 3 (never scored): 5.0133859
	}
	for _, tc := range []struct {
		name string
		mask any // nil: no mask
		want float64
	}{
		{"no mask: three pairs", nil, (nll[0] + nll[1] + nll[2]) / 3}, // 1.5819210
		{"all real", [][]bool{{true, true, true, true}}, (nll[0] + nll[1] + nll[2]) / 3},
		{"right padding", [][]bool{{true, true, true, false}}, (nll[0] + nll[1]) / 2}, // 1.2531091
		{"left padding", [][]bool{{false, true, true, true}}, (nll[1] + nll[2]) / 2},  // 1.8235754
		{"hole: both tokens must be real", [][]bool{{true, true, false, true}}, nll[0]},
		{"int mask", [][]int32{{1, 1, 1, 0}}, (nll[0] + nll[1]) / 2},
		{"float mask", [][]float32{{0, 1, 1, 1}}, (nll[1] + nll[2]) / 2},
		{"one real token: no pair, loss 0", [][]bool{{true, false, false, false}}, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := scalar(t, nil, func(_ *context.Context, g *graph.Graph) *graph.Node {
				labels := []*graph.Node{graph.Const(g, ids)}
				if tc.mask != nil {
					labels = append(labels, graph.Const(g, tc.mask))
				}
				return peft.NextTokenLoss(labels, []*graph.Node{graph.Const(g, logits)})
			})
			require.InDelta(t, tc.want, got, 1e-6)
		})
	}
	require.InDelta(t, 1.5819210064447915, (nll[0]+nll[1]+nll[2])/3, 1e-12)

	// Two sequences: the mean is over all valid pairs of the batch (3 + 1 = 4), not the mean
	// of the per-sequence means.
	got := scalar(t, nil, func(_ *context.Context, g *graph.Graph) *graph.Node {
		two := [][][]float32{logits[0], logits[0]}
		return peft.NextTokenLoss(
			[]*graph.Node{graph.Const(g, [][]int32{ids[0], ids[0]}), graph.Const(g, [][]bool{{true, true, true, true}, {false, false, true, true}})},
			[]*graph.Node{graph.Const(g, two)})
	})
	require.InDelta(t, (nll[0]+nll[1]+nll[2]+nll[2])/4, got, 1e-6)

	// A loss mask (labels[2]) marks the tokens to learn: a pair is scored when token t+1 is
	// marked (and both are real); the first token is never a target.
	for _, tc := range []struct {
		name string
		mask [][]int32
		want float64
	}{
		{"completion: tokens 2 and 3", [][]int32{{0, 0, 1, 1}}, (nll[1] + nll[2]) / 2},
		{"last token only", [][]int32{{0, 0, 0, 1}}, nll[2]},
		{"first token marked: it has no pair", [][]int32{{1, 0, 0, 0}}, 0},
		{"all", [][]int32{{1, 1, 1, 1}}, (nll[0] + nll[1] + nll[2]) / 3},
	} {
		t.Run("loss mask/"+tc.name, func(t *testing.T) {
			got := scalar(t, nil, func(_ *context.Context, g *graph.Graph) *graph.Node {
				return peft.NextTokenLoss([]*graph.Node{graph.Const(g, ids), graph.Const(g, [][]int32{{1, 1, 1, 1}}), graph.Const(g, tc.mask)},
					[]*graph.Node{graph.Const(g, logits)})
			})
			require.InDelta(t, tc.want, got, 1e-6)
		})
	}
}

// sumLoss is a toy loss: the sum of predictions[0] times the sum of labels[0].
func sumLoss(labels, predictions []*graph.Node) *graph.Node {
	return graph.Mul(graph.ReduceAllSum(predictions[0]), graph.ConvertDType(graph.ReduceAllSum(labels[0]), predictions[0].DType()))
}

func TestMultiTask(t *testing.T) {
	logits := [][]float32{{1, 2, 3}, {1, 1, 1}}
	ce := (logSumExp(1, 2, 3) - 3 + math.Log(3)) / 2
	loss, err := peft.MultiTask(
		peft.Task{Name: "classes", Weight: 2, Loss: peft.CrossEntropy, Labels: []int{0}, Predictions: []int{0}},
		peft.Task{Name: "sum", Weight: 0.5, Loss: sumLoss, Labels: []int{1}, Predictions: []int{1}},
		peft.Task{Name: "off", Weight: 0, Loss: sumLoss, Labels: []int{1}, Predictions: []int{1}},
	)
	require.NoError(t, err)
	got := scalar(t, nil, func(_ *context.Context, g *graph.Graph) *graph.Node {
		return loss(
			[]*graph.Node{graph.Const(g, []int32{2, 0}), graph.Const(g, []float32{1, 2})},
			[]*graph.Node{graph.Const(g, logits), graph.Const(g, []float32{0.5, 1.5})})
	})
	// 2·CE + 0.5·(0.5+1.5)·(1+2) + 0·… = 2·0.7531091 + 3.
	require.InDelta(t, 2*ce+3, got, 1e-5)

	for _, tc := range []struct {
		name  string
		tasks []peft.Task
		want  string
	}{
		{"no tasks", nil, "peft.MultiTask: no tasks"},
		{"no loss", []peft.Task{{Name: "a", Weight: 1, Labels: []int{0}, Predictions: []int{0}}}, `task 0 ("a") needs a loss`},
		{"negative weight", []peft.Task{
			{Name: "a", Weight: 1, Loss: sumLoss, Labels: []int{0}, Predictions: []int{0}},
			{Name: "b", Weight: -1, Loss: sumLoss, Labels: []int{0}, Predictions: []int{0}}}, `task 1 ("b") needs a loss, a weight ≥ 0`},
		{"no labels", []peft.Task{{Name: "c", Weight: 1, Loss: sumLoss, Predictions: []int{0}}}, `task 0 ("c")`},
		{"no predictions", []peft.Task{{Name: "d", Weight: 1, Loss: sumLoss, Labels: []int{0}}}, `task 0 ("d")`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fn, err := peft.MultiTask(tc.tasks...)
			require.ErrorContains(t, err, tc.want)
			require.Nil(t, fn)
		})
	}

	// An index past the labels the model was given fails when the graph is built, naming it.
	bad, err := peft.MultiTask(peft.Task{Name: "x", Weight: 1, Loss: sumLoss, Labels: []int{3}, Predictions: []int{0}})
	require.NoError(t, err)
	err = peft.Catch("build", func() error {
		_, err := context.ExecOnce(testBackend(t), context.New(), func(_ *context.Context, g *graph.Graph) *graph.Node {
			return bad([]*graph.Node{graph.Const(g, []float32{1})}, []*graph.Node{graph.Const(g, []float32{1})})
		})
		return err
	})
	require.ErrorContains(t, err, "index 3 out of range (have 1)")
}

func TestL2Toward(t *testing.T) {
	ctx := context.New()
	v1 := peft.NewVariable(ctx.In("a"), "w", []float32{1, 2}, 2)
	v2 := peft.NewVariable(ctx.In("b"), "w", []float32{3}, 1)
	a1 := peft.NewVariable(ctx.In("anchor_a"), "w", []float32{0.5, 0.5}, 2)
	a2 := peft.NewVariable(ctx.In("anchor_b"), "w", []float32{1}, 1)
	for _, tc := range []struct {
		name    string
		lambda  float64
		vars    []*context.Variable
		anchors []*context.Variable
		want    float64
	}{
		// 0.1·((1−0.5)² + (2−0.5)² + (3−1)²) = 0.1·6.5
		{"toward anchors", 0.1, []*context.Variable{v1, v2}, []*context.Variable{a1, a2}, 0.65},
		// 0.1·(1 + 4 + 9)
		{"plain L2", 0.1, []*context.Variable{v1, v2}, nil, 1.4},
		{"lambda scales", 2, []*context.Variable{v2}, nil, 18},
		{"no variables", 1, nil, nil, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := scalar(t, ctx, func(ctx *context.Context, g *graph.Graph) *graph.Node {
				return peft.L2Toward(g, tc.lambda, tc.vars, tc.anchors)
			})
			require.InDelta(t, tc.want, got, 1e-6)
		})
	}

	// The gradient reaches the variables (2λ(θ−θ₀)) and never the anchors.
	grads := run(t, ctx, func(ctx *context.Context, g *graph.Graph) *graph.Node {
		loss := peft.L2Toward(g, 0.1, []*context.Variable{v1}, []*context.Variable{a1})
		gs := graph.Gradient(loss, v1.ValueGraph(g), a1.ValueGraph(g))
		return graph.Concatenate(gs, 0)
	})
	require.InDeltaSlice(t, []float32{0.1, 0.3, 0, 0}, grads.Value().([]float32), 1e-6)
}

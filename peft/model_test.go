package peft_test

import (
	"errors"
	"testing"

	"github.com/gomlx/gomlx/pkg/core/graph"
	"github.com/gomlx/gomlx/pkg/core/shapes"
	"github.com/gomlx/gomlx/pkg/core/tensors"
	"github.com/gomlx/gomlx/pkg/ml/context"
	"github.com/gomlx/gopjrt/dtypes"
	"github.com/stretchr/testify/require"

	"peft/lora"
	"peft/peft"
	"peft/peft/pefttest"
)

// tinyParams is the tiny Llama classifier's parameter count, by hand: embeddings 64·32;
// per block two norms (2·32), q and o (2·32·32), k and v (2·32·16), gate, up and down (3·32·64);
// the final norm (32) and the score head (32·2).
const tinyParams = 64*32 + 2*(2*32+2*32*32+2*32*16+3*32*64) + 32 + 32*2 // 20,704

// twoLayerFn is a small model fn: a hidden linear layer with bias and a head.
func twoLayerFn(ctx *context.Context, _ any, inputs []*graph.Node) []*graph.Node {
	h := graph.Tanh(peft.Linear(ctx.In("hidden"), inputs[0], 3, true))
	return []*graph.Node{peft.OutputHead(ctx.In("out"), h, 2, false)}
}

type panickyMethod struct{ headMethod }

func (p *panickyMethod) Init(*context.Context, *peft.Layout) error { panic("init exploded") }

type failingMethod struct{ headMethod }

func (f *failingMethod) Init(*context.Context, *peft.Layout) error { return errors.New("init failed") }

func TestNewModelErrors(t *testing.T) {
	b := testBackend(t)
	example := shapes.Make(dtypes.Float32, 2, 4)
	for _, tc := range []struct {
		name string
		call func() (*peft.Model, error)
		want []string
	}{
		{"nil backend", func() (*peft.Model, error) { return peft.NewModel(nil, context.New(), twoLayerFn, nil, example) },
			[]string{"backend, ctx and fn must not be nil"}},
		{"nil ctx", func() (*peft.Model, error) { return peft.NewModel(b, nil, twoLayerFn, nil, example) },
			[]string{"backend, ctx and fn must not be nil"}},
		{"nil fn", func() (*peft.Model, error) { return peft.NewModel(b, context.New(), nil, nil, example) },
			[]string{"backend, ctx and fn must not be nil"}},
		{"no example", func() (*peft.Model, error) { return peft.NewModel(b, context.New(), twoLayerFn, nil) },
			[]string{"give the shape of at least one example input"}},
		{"model panics with a string", func() (*peft.Model, error) {
			return peft.NewModel(b, context.New(), func(*context.Context, any, []*graph.Node) []*graph.Node { panic("boom") }, nil, example)
		}, []string{"peft.NewModel: tracing the model", "boom"}},
		{"model panics with an error", func() (*peft.Model, error) {
			return peft.NewModel(b, context.New(), func(*context.Context, any, []*graph.Node) []*graph.Node {
				panic(errors.New("kaboom"))
			}, nil, example)
		}, []string{"tracing the model", "kaboom"}},
		{"model fails on the example shape", func() (*peft.Model, error) {
			return peft.NewModel(b, context.New(), twoLayerFn, nil, shapes.Make(dtypes.Float32))
		}, []string{"tracing the model", "rank ≥ 1"}},
		{"method init fails", func() (*peft.Model, error) {
			return peft.NewModel(b, context.New(), twoLayerFn, &failingMethod{}, example)
		}, []string{"peft.NewModel: head", "init failed"}},
		{"method init panics", func() (*peft.Model, error) {
			return peft.NewModel(b, context.New(), twoLayerFn, &panickyMethod{}, example)
		}, []string{"peft.NewModel: head", "init exploded"}},
		{"method selects nothing", func() (*peft.Model, error) {
			return peft.NewModel(b, context.New(), twoLayerFn, newHead("classifier"), example)
		}, []string{"peft.NewModel: head", `"classifier" matches no module`}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var m *peft.Model
			var err error
			require.NotPanics(t, func() { m, err = tc.call() })
			require.Nil(t, m)
			for _, want := range tc.want {
				require.ErrorContains(t, err, want)
			}
		})
	}
}

func TestNewModelFreezesAndReports(t *testing.T) {
	plain := pefttest.NewModel(t, nil)
	require.Nil(t, plain.Method())
	require.Empty(t, plain.TrainableVariables())
	require.Equal(t, peft.ParamReport{Trainable: 0, All: tinyParams}, plain.Report())
	for v := range plain.Context().IterVariables() {
		require.False(t, v.Trainable, "%s must be frozen without a method", v.ScopeAndName())
	}

	head := pefttest.NewModel(t, newHead("score"))
	require.Equal(t, peft.ParamReport{Trainable: 64, All: tinyParams}, head.Report())
	for v := range head.Context().IterVariables() {
		require.Equal(t, v.ScopeAndName() == "/score/dense/weights", v.Trainable, v.ScopeAndName())
	}

	// LoRA r=8 on q_proj (A 32·8, B 8·32) and v_proj (A 32·8, B 8·16) of 2 blocks, and the head.
	cfg := lora.DefaultConfig()
	cfg.ModulesToSave = []string{"score"}
	l, err := lora.New(cfg)
	require.NoError(t, err)
	m := pefttest.NewModel(t, l)
	loraParams := int64(2 * (32*8 + 8*32 + 32*8 + 8*16))
	require.Equal(t, peft.ParamReport{Trainable: loraParams + 64, All: tinyParams + loraParams}, m.Report())
	require.Equal(t, "trainable params: 1,856 || all params: 22,496 || trainable%: 8.2504", m.Report().String())
}

func TestModelCall(t *testing.T) {
	m := pefttest.NewModel(t, nil)
	ids := func(dims ...int) *tensors.Tensor {
		return tensors.FromFlatDataAndDimensions(make([]int32, shapes.Make(dtypes.Int32, dims...).Size()), dims...)
	}
	for _, tc := range []struct {
		name   string
		inputs []*tensors.Tensor
		want   string
	}{
		{"rank 1 ids", []*tensors.Tensor{ids(8)}, "token ids must be [batch, seq]"},
		{"sequence too long", []*tensors.Tensor{ids(1, 65)}, "exceeds max_position_embeddings 64"},
		{"no inputs", nil, "peft.Model.Call"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var err error
			require.NotPanics(t, func() { _, err = m.Call(tc.inputs...) })
			require.ErrorContains(t, err, tc.want)
		})
	}
	// The model still works after failed calls, for other shapes than the traced one too.
	for _, dims := range [][]int{{2, 3}, {1, 64}, {pefttest.Batch, pefttest.Seq}} {
		out, err := m.Call(ids(dims...))
		require.NoError(t, err)
		require.Len(t, out, 1)
		require.Equal(t, []int{dims[0], 2}, out[0].Shape().Dimensions)
	}
}

func TestMergeNeedsMerger(t *testing.T) {
	for _, tc := range []struct {
		name   string
		method peft.Method
		want   string
	}{
		{"method without Merger", newHead("score"), "method head cannot be merged into the base weights"},
		{"no method", nil, "method none cannot be merged"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := pefttest.NewModel(t, tc.method)
			before := pefttest.Logits(t, m)
			require.ErrorContains(t, m.Merge(), tc.want)
			require.ErrorContains(t, m.Unmerge(), tc.want)
			require.False(t, m.Merged())
			require.Equal(t, before, pefttest.Logits(t, m))
		})
	}
}

func TestCatch(t *testing.T) {
	sentinel := errors.New("sentinel")
	require.NoError(t, peft.Catch("what", func() error { return nil }))
	err := peft.Catch("what", func() error { return sentinel })
	require.ErrorIs(t, err, sentinel)
	require.EqualError(t, err, "what: sentinel")
	err = peft.Catch("what", func() error { panic(sentinel) })
	require.ErrorIs(t, err, sentinel, "a panicked error stays wrapped")
	require.EqualError(t, err, "what: sentinel")
	require.EqualError(t, peft.Catch("what", func() error { panic("text") }), "what: text")
	require.EqualError(t, peft.Catch("what", func() error { panic(42) }), "what: 42")
}

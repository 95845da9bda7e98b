package peft_test

import (
	"testing"

	"github.com/gomlx/gomlx/backends"
	"github.com/gomlx/gomlx/pkg/core/graph"
	"github.com/gomlx/gomlx/pkg/core/tensors"
	"github.com/gomlx/gomlx/pkg/ml/context"
	"github.com/stretchr/testify/require"

	"peft/peft"
	"peft/peft/backend"
)

// testBackend returns the process-wide backend.
func testBackend(t testing.TB) backends.Backend {
	t.Helper()
	b, err := backend.Get()
	require.NoError(t, err)
	return b
}

// run builds fn's graph in ctx (a fresh context if nil), executes it once and returns its output.
func run(t testing.TB, ctx *context.Context, fn func(ctx *context.Context, g *graph.Graph) *graph.Node) *tensors.Tensor {
	t.Helper()
	if ctx == nil {
		ctx = context.New()
	}
	out, err := context.ExecOnce(testBackend(t), ctx, fn)
	require.NoError(t, err)
	return out
}

// scalar runs fn and returns its scalar float32 output as float64.
func scalar(t testing.TB, ctx *context.Context, fn func(ctx *context.Context, g *graph.Graph) *graph.Node) float64 {
	t.Helper()
	v, ok := run(t, ctx, fn).Value().(float32)
	require.True(t, ok, "the graph must return a float32 scalar")
	return float64(v)
}

// headConfig is the configuration of headMethod.
type headConfig struct {
	Modules []string `json:"modules"`
}

// headMethod is a minimal method for the tests: it trains the named modules of the base model in
// full and implements no optional hook (in particular no Merger).
type headMethod struct {
	cfg  headConfig
	vars []*context.Variable
}

func newHead(modules ...string) *headMethod {
	if len(modules) == 0 {
		modules = []string{"score"}
	}
	return &headMethod{cfg: headConfig{Modules: modules}}
}

func (h *headMethod) Name() string { return "head" }
func (h *headMethod) Config() any  { return h.cfg }
func (h *headMethod) Init(_ *context.Context, layout *peft.Layout) error {
	vars, err := peft.ModulesToSave(layout, h.cfg.Modules)
	h.vars = vars
	return err
}
func (h *headMethod) Trainable(*context.Context) []peft.TrainableVariable {
	return peft.TrainAll(h.vars...)
}
func (h *headMethod) State(*context.Context) []*context.Variable { return h.vars }

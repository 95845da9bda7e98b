// Package multi serves many LoRA adapters from one base model: named adapters that load, switch
// and go away without rebuilding the base model or compiling anything new, and mixed batches in
// which each row names its own adapter (or none), computed in one graph, as Hugging Face PEFT's
// adapter_names argument and LoRAX do.
//
// For every served linear layer the model holds the factors of all adapter slots stacked, frozen:
//
//	A [N+1, in, R], B [N+1, R, out], scales [N+1]
//
// with N the number of slots (Config.Slots) and R the largest rank (Config.MaxRank). Slot 0 is
// all zeros: the base model. An adapter of smaller rank is zero-padded to R, which is exact (the
// padded terms add zeros), and the layers an adapter does not target stay zero in its slot.
// Every row b of a batch carries a slot index k_b, and each served layer computes
//
//	y_b = x_b·W + s[k_b]·(x_b·A[k_b])·B[k_b]
//
// with the factors gathered per row (two batched einsums). The row slots are an input of the
// graph (Model.Call), so concurrent calls with different rows share nothing; calls that give no
// rows (peft.Model.Call, peft/generate) use the slot Model.Use selected for the whole batch.
// Loading an adapter writes its factors into a free slot (SetValue on the stacked variables):
// the shapes do not change, so no graph is rebuilt.
//
// Storage: the stacked factors live in <layer>/multi_lora ("A", "B", "scales") in GoMLX's
// [in, out] layout (A[k] is the transpose of PEFT's lora_A.weight [r, in], B[k] of lora_B.weight
// [out, r]), and the slot Use selected in /multi_lora/active (int32 scalar).
//
// What cannot be served per row is refused with an error naming it: DoRA adapters (their
// magnitudes renormalize the whole weight; PEFT refuses adapter_names with DoRA too),
// modules_to_save (a module is one set of weights per model, not per row), adapters of another
// base model, ranks above MaxRank, layers outside the served targets or of another shape.
package multi

import (
	"fmt"
	"sync"

	"github.com/gomlx/gomlx/pkg/core/graph"
	"github.com/gomlx/gomlx/pkg/core/tensors"
	"github.com/gomlx/gomlx/pkg/ml/context"

	"peft/peft"
)

// Config configures the adapter slots of a model. Start from DefaultConfig.
type Config struct {
	// Slots is the number of adapters the model can hold at once (N). Default 4. Must be > 0.
	// Each slot costs R·(in+out)+1 floats per served layer, loaded or not.
	Slots int `json:"slots"`
	// MaxRank is the largest LoRA rank an adapter may have on any layer (R); smaller ranks are
	// zero-padded to it. Default 16. Must be > 0. The per-row computation costs in proportion to
	// it, so set it to the largest rank you serve.
	MaxRank int `json:"max_rank"`
	// TargetModules selects the layers adapters may adapt (Hugging Face semantics, see
	// peft.Targets). Default "all-linear": every linear layer but the output head.
	TargetModules peft.Targets `json:"target_modules"`
}

// DefaultConfig returns 4 slots of rank up to 16 on every linear layer but the head.
func DefaultConfig() Config {
	return Config{Slots: 4, MaxRank: 16, TargetModules: peft.TargetPattern(peft.AllLinear)}
}

// Validate checks the configuration, naming the first field that is wrong.
func (c Config) Validate() error {
	if c.Slots <= 0 {
		return fmt.Errorf("multi: slots must be > 0, got %d", c.Slots)
	}
	if c.MaxRank <= 0 {
		return fmt.Errorf("multi: max_rank must be > 0, got %d", c.MaxRank)
	}
	if err := c.TargetModules.Validate(); err != nil {
		return fmt.Errorf("multi: target_modules: %w", err)
	}
	return nil
}

// method is the peft.Method and peft.LinearHook that serves the slots; Model drives it.
type method struct {
	cfg    Config
	layout *peft.Layout
	order  []*served          // model order
	byPath map[string]*served // by layer path
	active *context.Variable  // the slot of calls without rows

	mu     sync.Mutex
	graphs map[graph.GraphId]bool // graphs built with the method
}

// served is one served layer's stacked factors.
type served struct {
	layer        *peft.LinearLayer
	a, b, scales *context.Variable
	aSize, bSize int // values per slot of A and B
	rank         int // R
}

// graphParamRows is the graph parameter holding the per-row slots ([batch] int32) of a graph
// built by Model.Call.
const graphParamRows = "multi_lora_rows"

// Name implements peft.Method.
func (mt *method) Name() string { return "multi_lora" }

// Config implements peft.Method.
func (mt *method) Config() any { return mt.cfg }

// Init creates the zeroed stacked factors of every served layer and the active slot.
func (mt *method) Init(ctx *context.Context, layout *peft.Layout) error {
	selected, err := mt.cfg.TargetModules.Select(layout)
	if err != nil {
		return fmt.Errorf("multi: %w", err)
	}
	n, r := mt.cfg.Slots+1, mt.cfg.MaxRank
	mt.layout, mt.byPath, mt.order = layout, map[string]*served{}, nil
	for _, layer := range selected {
		scope := ctx.InAbsPath(layer.Scope).In("multi_lora")
		s := &served{layer: layer, aSize: layer.In * r, bSize: r * layer.Out, rank: r,
			a:      peft.NewVariable(scope, "A", make([]float32, n*layer.In*r), n, layer.In, r),
			b:      peft.NewVariable(scope, "B", make([]float32, n*r*layer.Out), n, r, layer.Out),
			scales: peft.NewVariable(scope, "scales", make([]float32, n), n),
		}
		mt.order = append(mt.order, s)
		mt.byPath[layer.Path] = s
	}
	mt.active = ctx.InAbsPath(context.RootScope).In("multi_lora").Checked(false).
		VariableWithValue("active", tensors.FromScalar(int32(0)))
	mt.graphs = map[graph.GraphId]bool{}
	return nil
}

// Trainable is empty: served adapters are frozen (train them with package lora).
func (mt *method) Trainable(*context.Context) []peft.TrainableVariable { return nil }

// State is the stacked factors of every served layer.
func (mt *method) State(*context.Context) []*context.Variable {
	vars := make([]*context.Variable, 0, 3*len(mt.order))
	for _, s := range mt.order {
		vars = append(vars, s.a, s.b, s.scales)
	}
	return vars
}

// Linear adds the update of each row's slot to the base output of a served layer: gathered per
// row in graphs with rows (Model.Call), the active slot's for the whole batch otherwise.
func (mt *method) Linear(ctx *context.Context, layer *peft.LinearLayer, x *graph.Node) *graph.Node {
	y := layer.Base(ctx, x)
	s := mt.byPath[layer.Path]
	if s == nil {
		return y
	}
	g := x.Graph()
	mt.mu.Lock()
	mt.graphs[g.GraphId()] = true
	mt.mu.Unlock()
	a, b, scales := s.a.ValueGraph(g), s.b.ValueGraph(g), s.scales.ValueGraph(g)
	if value, found := ctx.GetGraphParam(g, graphParamRows); found {
		rows := value.(*graph.Node)
		batch := x.Shape().Dim(0)
		if rows.Shape().Dim(0) != batch {
			panic(fmt.Sprintf("multi: layer %s: %d row slots for a batch of %d", layer.Path, rows.Shape().Dim(0), batch))
		}
		index := graph.ExpandAxes(rows, -1)                          // [batch, 1]
		rowA, rowB := graph.Gather(a, index), graph.Gather(b, index) // [batch, in, R], [batch, R, out]
		rowScales := graph.Reshape(graph.Gather(scales, index), batch, 1, 1)
		x3 := graph.Reshape(x, batch, -1, layer.In)
		update := graph.Einsum("bsr,bro->bso", graph.Einsum("bsi,bir->bsr", x3, rowA), rowB)
		update = graph.Mul(update, rowScales)
		return graph.Add(y, graph.Reshape(update, y.Shape().Dimensions...))
	}
	index := graph.Reshape(mt.active.ValueGraph(g), 1)
	update := peft.MatMulLast(peft.MatMulLast(x, graph.Gather(a, index)), graph.Gather(b, index))
	return graph.Add(y, graph.Mul(update, graph.Gather(scales, index)))
}

// graphsBuilt is the number of distinct graphs built with the method.
func (mt *method) graphsBuilt() int {
	mt.mu.Lock()
	defer mt.mu.Unlock()
	return len(mt.graphs)
}

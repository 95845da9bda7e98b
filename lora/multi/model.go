package multi

import (
	"errors"
	"fmt"
	"math"
	"slices"
	"sort"
	"sync"

	"github.com/gomlx/gomlx/backends"
	"github.com/gomlx/gomlx/pkg/core/graph"
	"github.com/gomlx/gomlx/pkg/core/shapes"
	"github.com/gomlx/gomlx/pkg/core/tensors"
	"github.com/gomlx/gomlx/pkg/ml/context"

	"peft/lora"
	"peft/lora/combine"
	"peft/peft"
)

// Model is a base model serving named LoRA adapters: Load or Add them into free slots, Use one
// for whole batches, Call with one adapter per row, Delete them, all without rebuilding the base
// model's variables or, while input shapes stay the same, compiling anything new.
//
// Concurrency: every method may be called from several goroutines. Call (and the underlying
// peft.Model's Call and CallFn) run concurrently with each other: the rows of a Call are an input
// of its graph, so nothing has to be serialized between choosing rows and running them. Load,
// Add, Delete and Use wait for running calls, change the slots while no call runs, and make new
// calls wait for them; a Call resolves its row names and runs under one read lock, so a row never
// runs with an adapter deleted or replaced after the name was looked up. What is not atomic is Use
// followed by a call without rows: another goroutine's Use may come between, so code that serves
// several adapters from several goroutines names them per call (Call, CallFn) and leaves Use to
// single-adapter work.
type Model struct {
	model  *peft.Model
	fn     peft.ModelFn
	method *method

	mu     sync.RWMutex
	slots  []string       // the adapter in slot k+1, "" when free
	byName map[string]int // slot of each loaded adapter
	use    string         // the adapter Use selected ("" for the base)
}

// NewModel applies cfg's adapter slots to the model fn whose variables live in ctx (as
// peft.NewModel does, tracing it with inputs shaped like example). All slots start empty: the
// model computes exactly what the base model computes.
func NewModel(backend backends.Backend, ctx *context.Context, fn peft.ModelFn, cfg Config, example ...shapes.Shape) (*Model, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	mt := &method{cfg: cfg}
	m, err := peft.NewModel(backend, ctx, fn, mt, example...)
	if err != nil {
		return nil, err
	}
	return &Model{model: m, fn: fn, method: mt, slots: make([]string, cfg.Slots), byName: map[string]int{}}, nil
}

// PEFT returns the underlying peft.Model: its Call, CallFn and peft/generate run the adapter Use
// selected on every row.
func (m *Model) PEFT() *peft.Model { return m.model }

// Targets lists the paths of the served layers, in model order: the layers adapters may adapt.
func (m *Model) Targets() []string {
	paths := make([]string, len(m.method.order))
	for i, s := range m.method.order {
		paths[i] = s.layer.Path
	}
	return paths
}

// Names lists the loaded adapters, sorted.
func (m *Model) Names() []string {
	m.mu.RLock()
	defer m.mu.RUnlock()
	names := make([]string, 0, len(m.byName))
	for name := range m.byName {
		names = append(names, name)
	}
	sort.Strings(names)
	return names
}

// GraphsBuilt is the number of graphs built (and compiled) with the adapter slots so far: one per
// entry point (Call, the peft.Model's Call, each CallFn key) and input shape. Loading, using and
// deleting adapters leave it unchanged, which a server can watch to know it compiles nothing new.
func (m *Model) GraphsBuilt() int { return m.method.graphsBuilt() }

// Load reads the Hugging Face PEFT LoRA adapter folder dir (written by this SDK or by PEFT; see
// peft.FindAdapter for sub-folders) into a free slot under name. Refused, with an error naming
// the problem: a name already loaded or empty, no free slot, another peft_type, DoRA,
// modules_to_save, an adapter this SDK saved on other base weights (peft.ErrOtherBase), another
// task_type, and what Add refuses.
func (m *Model) Load(name, dir string) error {
	a, err := m.read(dir)
	if err != nil {
		return fmt.Errorf("multi: Load %q: %w", name, err)
	}
	return m.Add(name, a)
}

// read reads the adapter folder dir, refusing what cannot be served per row.
func (m *Model) read(dir string) (*combine.Adapter, error) {
	saved, err := peft.ReadAdapter(dir)
	if err != nil {
		return nil, err
	}
	if saved.Format != peft.FormatPEFT {
		return nil, fmt.Errorf("%s holds a %s state in this SDK's own layout, not a LoRA adapter", saved.Dir, saved.Method)
	}
	fields := saved.Fields
	if got := fields.PEFTType(); got != "LORA" {
		return nil, fmt.Errorf("%s: peft_type %s: only LORA adapters can be served per row", fields.Source(), got)
	}
	cfg, err := lora.ParsePEFTConfig(fields)
	if err != nil {
		return nil, err
	}
	if cfg.UseDoRA {
		return nil, fmt.Errorf("%s: use_dora: DoRA adapters cannot be served per row (their magnitudes renormalize the whole weight; PEFT refuses adapter_names with DoRA too)", fields.Source())
	}
	if len(cfg.ModulesToSave) > 0 {
		return nil, fmt.Errorf("%s: modules_to_save %q: a module is one set of weights for the whole model, so it cannot change per row; serve adapters without modules_to_save", fields.Source(), cfg.ModulesToSave)
	}
	if saved.BaseFingerprint != "" && saved.BaseFingerprint != m.model.BaseFingerprint() {
		return nil, fmt.Errorf("%w: %s was saved on a base model whose weights have fingerprint %.16s…, this model's base has %.16s…",
			peft.ErrOtherBase, saved.Dir, saved.BaseFingerprint, m.model.BaseFingerprint())
	}
	var task string
	if err := fields.Get("task_type", &task); err != nil {
		return nil, err
	}
	if ours := m.model.Layout().Task; task != "" && ours != "" && peft.TaskType(task) != ours {
		return nil, fmt.Errorf("%s: task_type %s, the model is %s", fields.Source(), task, ours)
	}
	folder, err := combine.ReadFolder(saved.Dir)
	if err != nil {
		return nil, err
	}
	return &folder.Adapter, nil
}

// Add puts the LoRA adapter a (its Layers, in PyTorch's layout: A [rank, in], B [out, rank] per
// layer, as package combine holds adapters; its Name, Rank and Targets are not used) into a free
// slot under name. Refused, with an error naming the
// problem and leaving the model as it was: an empty name or one already loaded, no free slot, a
// layer the model does not serve, a layer whose sizes differ from the model's, a rank above
// MaxRank, factors of the wrong length, a scale that is not finite, a layer given twice.
func (m *Model) Add(name string, a *combine.Adapter) error {
	if name == "" {
		return errors.New(`multi: an adapter needs a name ("" stands for the base model)`)
	}
	if a == nil || len(a.Layers) == 0 {
		return fmt.Errorf("multi: adapter %q has no layers", name)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, found := m.byName[name]; found {
		return fmt.Errorf("multi: adapter %q is already loaded: Delete it first to replace it", name)
	}
	slot := slices.Index(m.slots, "") + 1
	if slot == 0 {
		return fmt.Errorf("multi: no free slot for adapter %q: all %d hold adapters (%q); Delete one or raise Config.Slots",
			name, len(m.slots), m.slots)
	}
	seen := map[string]bool{}
	for i := range a.Layers {
		if err := m.check(&a.Layers[i], seen); err != nil {
			return fmt.Errorf("multi: adapter %q: %w", name, err)
		}
	}
	layers := map[string]*combine.Layer{}
	for i := range a.Layers {
		layers[a.Layers[i].Path] = &a.Layers[i]
	}
	if err := m.model.WithExclusive(func() error { return m.write(slot, layers) }); err != nil {
		return fmt.Errorf("multi: adapter %q: %w", name, err)
	}
	m.slots[slot-1], m.byName[name] = name, slot
	return nil
}

// check refuses a layer the slots cannot hold.
func (m *Model) check(l *combine.Layer, seen map[string]bool) error {
	s := m.method.byPath[l.Path]
	switch {
	case s == nil:
		return fmt.Errorf("layer %s is not served (Config.TargetModules %s serve %d layers: %v)",
			l.Path, m.method.cfg.TargetModules, len(m.method.order), m.Targets())
	case seen[l.Path]:
		return fmt.Errorf("layer %s is given twice", l.Path)
	case l.In != s.layer.In || l.Out != s.layer.Out:
		return fmt.Errorf("layer %s is %d×%d (in×out), the model's is %d×%d", l.Path, l.In, l.Out, s.layer.In, s.layer.Out)
	case l.Rank <= 0 || l.Rank > s.rank:
		return fmt.Errorf("layer %s has rank %d, the slots hold ranks 1 to %d (Config.MaxRank)", l.Path, l.Rank, s.rank)
	case len(l.A) != l.Rank*l.In || len(l.B) != l.Out*l.Rank:
		return fmt.Errorf("layer %s: A has %d values and B %d, rank %d needs %d and %d", l.Path, len(l.A), len(l.B), l.Rank, l.Rank*l.In, l.Out*l.Rank)
	case math.IsNaN(l.Scale) || math.IsInf(l.Scale, 0):
		return fmt.Errorf("layer %s: scale %g is not a finite number", l.Path, l.Scale)
	}
	seen[l.Path] = true
	return nil
}

// write sets slot of every served layer to the layer's factors in layers (zero for the layers
// missing there), zero-padded to MaxRank. All values are computed before any variable changes.
func (m *Model) write(slot int, layers map[string]*combine.Layer) error {
	type update struct {
		v      *context.Variable
		values []float32
	}
	var updates []update
	for _, s := range m.method.order {
		values := make([][]float32, 3)
		for i, v := range []*context.Variable{s.a, s.b, s.scales} {
			var err error
			if values[i], err = peft.Float32s(v); err != nil {
				return err
			}
		}
		a := values[0][slot*s.aSize : (slot+1)*s.aSize]
		b := values[1][slot*s.bSize : (slot+1)*s.bSize]
		clear(a)
		clear(b)
		values[2][slot] = 0
		if l := layers[s.layer.Path]; l != nil {
			in, out, r := s.layer.In, s.layer.Out, s.rank
			for k := range l.Rank {
				for i := range in {
					a[i*r+k] = l.A[k*in+i] // Aᵀ: [in, R]
				}
				for o := range out {
					b[k*out+o] = l.B[o*l.Rank+k] // Bᵀ: [R, out]
				}
			}
			values[2][slot] = float32(l.Scale)
		}
		updates = append(updates, update{s.a, values[0]}, update{s.b, values[1]}, update{s.scales, values[2]})
	}
	for _, u := range updates {
		if err := peft.SetFloat32s(u.v, u.values); err != nil {
			return err
		}
	}
	return nil
}

// Delete removes the adapter name and zeroes its slot, which a later Load or Add reuses. If Use
// had selected it, calls without rows run the base model afterwards.
func (m *Model) Delete(name string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if name == "" {
		return errors.New(`multi: Delete: the base model ("") cannot be deleted`)
	}
	slot, err := m.slotOf(name)
	if err != nil {
		return fmt.Errorf("multi: Delete: %w", err)
	}
	if err := m.model.WithExclusive(func() error {
		if m.use == name {
			if err := m.method.active.SetValue(tensors.FromScalar(int32(0))); err != nil {
				return err
			}
		}
		return m.write(slot, nil)
	}); err != nil {
		return fmt.Errorf("multi: Delete %q: %w", name, err)
	}
	if m.use == name {
		m.use = ""
	}
	m.slots[slot-1] = ""
	delete(m.byName, name)
	return nil
}

// Use selects the adapter that calls without rows run on every row (the peft.Model's Call and
// CallFn, peft/generate): name, or "" for the base model alone. It changes a variable's value, so
// it compiles nothing.
func (m *Model) Use(name string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	slot, err := m.slotOf(name)
	if err != nil {
		return fmt.Errorf("multi: Use: %w", err)
	}
	if err := m.model.WithExclusive(func() error {
		return m.method.active.SetValue(tensors.FromScalar(int32(slot)))
	}); err != nil {
		return fmt.Errorf("multi: Use %q: %w", name, err)
	}
	m.use = name
	return nil
}

// slotOf returns the slot of the adapter name (0 for "", the base). The caller holds m.mu.
func (m *Model) slotOf(name string) (int, error) {
	if name == "" {
		return 0, nil
	}
	slot, found := m.byName[name]
	if !found {
		return 0, fmt.Errorf("no adapter %q is loaded (loaded: %q)", name, m.namesLocked())
	}
	return slot, nil
}

func (m *Model) namesLocked() []string {
	names := make([]string, 0, len(m.byName))
	for _, name := range m.slots {
		if name != "" {
			names = append(names, name)
		}
	}
	return names
}

// Call runs the model (in inference mode) on inputs, each row b with the adapter rows[b] ("" for
// the base model), all in one graph, and returns the outputs. inputs are the model's own (token
// ids, and a mask if it takes one), checked as peft.Model.Call checks them; rows has one name per
// row of the batch. Graphs are compiled once per input shape: which adapters the rows name
// changes nothing there.
func (m *Model) Call(rows []string, inputs ...*tensors.Tensor) ([]*tensors.Tensor, error) {
	if len(inputs) == 0 {
		return nil, errors.New("multi: Call: no inputs")
	}
	if err := m.model.CheckInputs(inputs); err != nil {
		return nil, fmt.Errorf("multi: Call: %w", err)
	}
	return m.call("multi/call", m.fn, rows, inputs)
}

// CallFn is Call for fn, another model function over the same variables whose first input's
// first axis is the batch (as peft.Model.CallFn runs it, under the key "multi/fn/"+key; key must
// name fn and what its closure fixes): how a server runs llama.CausalLMPrefill and llama.CausalLMStep
// with one adapter per row. Like peft.Model.CallFn it does not check the inputs.
func (m *Model) CallFn(key string, fn peft.ModelFn, rows []string, inputs ...*tensors.Tensor) ([]*tensors.Tensor, error) {
	return m.call("multi/fn/"+key, fn, rows, inputs)
}

// call runs fn with rows through the peft.Model's executor of key.
func (m *Model) call(key string, fn peft.ModelFn, rows []string, inputs []*tensors.Tensor) ([]*tensors.Tensor, error) {
	if len(inputs) == 0 || inputs[0].Rank() == 0 {
		return nil, errors.New("multi: Call: give at least one input with a batch axis")
	}
	if batch := inputs[0].Shape().Dim(0); len(rows) != batch {
		return nil, fmt.Errorf("multi: Call: %d row adapters for a batch of %d rows: give one name per row (\"\" for the base model)", len(rows), batch)
	}
	m.mu.RLock()
	defer m.mu.RUnlock()
	slots := make([]int32, len(rows))
	for i, name := range rows {
		slot, err := m.slotOf(name)
		if err != nil {
			return nil, fmt.Errorf("multi: Call: row %d: %w", i, err)
		}
		slots[i] = int32(slot)
	}
	withRows := func(ctx *context.Context, spec any, nodes []*graph.Node) []*graph.Node {
		last := len(nodes) - 1
		ctx.SetGraphParam(nodes[0].Graph(), graphParamRows, nodes[last])
		return fn(ctx, spec, nodes[:last])
	}
	args := append(slices.Clone(inputs), tensors.FromValue(slots))
	outputs, err := m.model.CallFn(key, withRows, args...)
	if err != nil {
		return nil, fmt.Errorf("multi: %w", err)
	}
	return outputs, nil
}

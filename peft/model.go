package peft

import (
	"fmt"
	"strings"
	"sync"

	"github.com/gomlx/gomlx/backends"
	"github.com/gomlx/gomlx/pkg/core/graph"
	"github.com/gomlx/gomlx/pkg/core/shapes"
	"github.com/gomlx/gomlx/pkg/core/tensors"
	"github.com/gomlx/gomlx/pkg/ml/context"
	"github.com/gomlx/gomlx/pkg/ml/train"
)

// ModelFn is a GoMLX model function (the same type train.Trainer takes): it builds the model's
// graph for the given inputs and returns its predictions. Write it with this package's building
// blocks so that methods can attach to it.
type ModelFn = train.ModelFn

// Model is a model function with a fine-tuning method applied: what you train, evaluate, save
// and serve. Create it with NewModel.
type Model struct {
	backend backends.Backend
	ctx     *context.Context
	fn      ModelFn
	method  Method
	layout  *Layout

	mu    sync.Mutex
	execs map[execKey]*context.Exec // inference executors (Call's and CallFn's)
	// state guards the variables: calls read them together (RLock); Save, Load, Merge, Unmerge
	// and training hold it alone (Lock).
	state sync.RWMutex
	// graphVersion changes whenever what the model's graphs compute changes (merge, unmerge), so
	// that trainers know to rebuild theirs.
	graphVersion int
	// fingerprint is BaseFingerprint.
	fingerprint string
}

// NewModel applies method to the model fn whose variables live in ctx. It builds fn's graph once
// for inputs shaped like example (no computation runs) to find the model's layout, initializes
// the model's variables that have no value yet, lets the method create its own variables, and
// freezes every variable the method does not train.
//
// method may be nil: the model then runs as it is and nothing trains. A method value holds the
// variables it created, so it belongs to the one model it was applied to: build a new method
// (with the same Config) for each model.
func NewModel(backend backends.Backend, ctx *context.Context, fn ModelFn, method Method, example ...shapes.Shape) (*Model, error) {
	if backend == nil || ctx == nil || fn == nil {
		return nil, fmt.Errorf("peft.NewModel: backend, ctx and fn must not be nil")
	}
	if len(example) == 0 {
		return nil, fmt.Errorf("peft.NewModel: give the shape of at least one example input, to trace the model's layout")
	}
	m := &Model{backend: backend, ctx: ctx, fn: fn, method: method, execs: map[execKey]*context.Exec{}}
	layout, err := traceLayout(backend, ctx, fn, example)
	if err != nil {
		return nil, err
	}
	m.layout = layout
	if err := catch("peft.NewModel: initializing the model's variables", func() error {
		return ctx.InitializeVariables(backend, nil)
	}); err != nil {
		return nil, err
	}
	if method == nil {
		for _, v := range layout.BaseVariables {
			v.SetTrainable(false)
		}
		registerModel(ctx, m)
		return m, nil
	}
	release, err := reserveMethod(method)
	if err != nil {
		return nil, err
	}
	bound := false
	defer func() {
		if !bound {
			release()
		}
	}()
	if err := catch("peft.NewModel: "+method.Name(), func() error {
		err := method.Init(ctx, layout)
		if err != nil {
			if rest, found := strings.CutPrefix(err.Error(), method.Name()+": "); found {
				return trimmedError{rest, err} // name the method once
			}
		}
		return err
	}); err != nil {
		return nil, err
	}
	if err := catch("peft.NewModel: fingerprinting the base model", func() error {
		m.fingerprint, err = m.baseFingerprint()
		return err
	}); err != nil {
		return nil, err
	}
	if err := catch("peft.NewModel: initializing the method's variables", func() error {
		return ctx.InitializeVariables(backend, nil)
	}); err != nil {
		return nil, err
	}
	// Freeze everything, then unfreeze exactly what the method trains: GoMLX reads Trainable when
	// it builds a graph, and nothing else (trainer bookkeeping included) may be swept in.
	for v := range ctx.IterVariables() {
		v.SetTrainable(false)
	}
	for _, tv := range method.Trainable(ctx) {
		tv.Variable.SetTrainable(true)
	}
	bindMethod(method, m)
	bound = true
	registerModel(ctx, m)
	return m, nil
}

// BaseFingerprint identifies the base weights the method was applied to: a SHA-256 (hex) over the
// names, shapes and CRC-32C checksums of the base model's variables that the method does not save
// (so a new classifier head saved with the adapter does not count), with the frozen form of the
// weights a method replaced (QLoRA's 4-bit weights: the same whether it quantized them itself or
// loaded a 4-bit checkpoint). Save records it and Load compares it, so that an adapter is not
// applied to another base by mistake. It is "" for a plain model and for full fine-tuning, whose
// saved state is the whole model.
func (m *Model) BaseFingerprint() string { return m.fingerprint }

// baseFingerprint computes BaseFingerprint after the method's Init.
func (m *Model) baseFingerprint() (string, error) {
	saved := map[string]bool{}
	for _, v := range m.method.State(m.ctx) {
		saved[v.ScopeAndName()] = true
	}
	var vars []*context.Variable
	for _, v := range m.layout.BaseVariables {
		if m.ctx.GetVariableByScopeAndName(v.Scope(), v.Name()) == v { // not replaced by the method
			vars = append(vars, v)
		}
	}
	if r, ok := m.method.(BaseReplacer); ok {
		vars = append(vars, r.ReplacedBase()...)
	}
	digests, err := variableDigests(vars)
	if err != nil {
		return "", err
	}
	return fingerprint(digests, saved), nil
}

// traceLayout builds fn's graph once, without compiling or running it, recording every building
// block that runs.
func traceLayout(backend backends.Backend, ctx *context.Context, fn ModelFn, example []shapes.Shape) (*Layout, error) {
	layout := &Layout{}
	err := catch("peft.NewModel: tracing the model", func() error {
		g := graph.NewGraph(backend, "peft_trace")
		defer g.Finalize()
		inputs := make([]*graph.Node, len(example))
		for i, shape := range example {
			inputs[i] = graph.Parameter(g, fmt.Sprintf("input_%d", i), shape)
		}
		ctx.SetGraphParam(g, graphParamActive, &active{trace: layout})
		outputs := fn(ctx.Checked(false), nil, inputs)
		layout.NumInputs = len(example)
		for _, out := range outputs {
			layout.Outputs = append(layout.Outputs, out.Shape())
		}
		// The model's variables are those its graph reads: not an optimizer's moments, a
		// trainer's metrics or another method's weights that the context may also hold.
		for v := range ctx.IterVariables() {
			if v.InUseByGraph(g) {
				layout.BaseVariables = append(layout.BaseVariables, v)
			}
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return layout, nil
}

// Backend returns the backend the model runs on.
func (m *Model) Backend() backends.Backend { return m.backend }

// Context returns the context holding the model's and the method's variables.
func (m *Model) Context() *context.Context { return m.ctx }

// Method returns the applied method (nil for a plain model).
func (m *Model) Method() Method { return m.method }

// Layout returns what tracing found in the model: its linear layers, sub-blocks and inputs.
func (m *Model) Layout() *Layout { return m.layout }

// Fn returns the model function with the method applied: pass it to GoMLX's trainer or executors
// to run the model with the method. Graphs built from it before Merge or Unmerge compute the old
// model afterwards: rebuild them (Trainer and Call do this by themselves).
func (m *Model) Fn() ModelFn { return m.withMethod(m.fn) }

// withMethod returns fn run with the model's method active: what Fn returns for the model's own
// function and CallFn compiles for another.
func (m *Model) withMethod(fn ModelFn) ModelFn {
	return func(ctx *context.Context, spec any, inputs []*graph.Node) []*graph.Node {
		g := inputs[0].Graph()
		ctx.SetGraphParam(g, graphParamActive, &active{method: m.method})
		outputs := fn(ctx.Checked(false), spec, inputs)
		if hook, ok := m.method.(LossHook); ok && ctx.IsTraining(g) {
			if extra := hook.Loss(ctx, g); extra != nil {
				train.AddLoss(ctx, extra)
			}
		}
		return outputs
	}
}

// Call runs the model (in inference mode) on inputs and returns its outputs. Graphs are compiled
// once per input shape and reused. The inputs are checked first (CheckInputs): token ids out of
// the vocabulary, a mask of another shape or an input too many is an error naming it. Calls run
// concurrently with each other; Save, Load, Merge, Unmerge and training wait for running calls
// and calls wait for them.
func (m *Model) Call(inputs ...*tensors.Tensor) ([]*tensors.Tensor, error) {
	if len(inputs) == 0 {
		return nil, fmt.Errorf("peft.Model.Call: no inputs")
	}
	if err := m.CheckInputs(inputs); err != nil {
		return nil, fmt.Errorf("peft.Model.Call: %w", err)
	}
	return m.run(execKey{inputs: len(inputs)}, m.fn, "peft.Model.Call", inputs)
}

// execKey names a compiled inference executor: Call's by its number of inputs (fn ""), CallFn's
// by its key and number of inputs.
type execKey struct {
	fn     string
	inputs int
}

// CallFn runs fn, another model function over the same variables, in inference mode with the
// model's method active (its variables and hooks, as in Call), and returns its outputs: how a
// model's second entry point runs, such as the key/value-cached decoding of llama.CausalLMPrefill
// and llama.CausalLMStep that peft/generate uses. The executor is built on the first call for a
// key and reused by every later call with that key and as many inputs (one graph compiled per
// input shape), so key must name fn and everything fn's closure fixes: a call with another fn
// under a used key runs the first. Merge and Unmerge drop these executors as they drop Call's.
//
// Unlike Call, CallFn does not check the inputs (they are fn's own; Call's CheckInputs knows only
// the model's ids and mask): the caller checks them. It locks like Call.
func (m *Model) CallFn(key string, fn ModelFn, inputs ...*tensors.Tensor) ([]*tensors.Tensor, error) {
	if key == "" || fn == nil || len(inputs) == 0 {
		return nil, fmt.Errorf("peft.Model.CallFn: give a key, a function and at least one input")
	}
	return m.run(execKey{fn: key, inputs: len(inputs)}, fn, "peft.Model.CallFn "+key, inputs)
}

// run executes fn with the method active on inputs through the executor of key, building it on
// first use; what names the caller in errors.
func (m *Model) run(key execKey, fn ModelFn, what string, inputs []*tensors.Tensor) ([]*tensors.Tensor, error) {
	m.state.RLock()
	defer m.state.RUnlock()
	m.mu.Lock()
	exec, found := m.execs[key]
	if !found {
		var err error
		withMethod := m.withMethod(fn)
		err = catch(what+": building the executor", func() error {
			exec, err = context.NewExec(m.backend, m.ctx, func(ctx *context.Context, nodes []*graph.Node) []*graph.Node {
				return withMethod(ctx, nil, nodes)
			})
			return err
		})
		if err != nil {
			m.mu.Unlock()
			return nil, err
		}
		m.execs[key] = exec
	}
	m.mu.Unlock()
	args := make([]any, len(inputs))
	for i, t := range inputs {
		args[i] = t
	}
	var outputs []*tensors.Tensor
	err := catch(what, func() error {
		var err error
		outputs, err = exec.Exec(args...)
		return err
	})
	return outputs, err
}

// resetExecutors drops compiled inference graphs: needed when what a graph computes changes
// (merge, unmerge).
func (m *Model) resetExecutors() {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, e := range m.execs {
		e.Finalize()
	}
	m.execs = map[execKey]*context.Exec{}
}

// Merge folds the method's update into the base weights so inference costs nothing extra.
// It is an error for methods whose math does not allow it.
func (m *Model) Merge() error {
	return m.withMerger("Merge", func(merger Merger) error { return merger.Merge(m.ctx) })
}

// Unmerge undoes Merge, restoring the base weights exactly.
func (m *Model) Unmerge() error {
	return m.withMerger("Unmerge", func(merger Merger) error { return merger.Unmerge(m.ctx) })
}

// withMerger runs op on the method's Merger and drops the compiled graphs, whose computation
// changes with it.
func (m *Model) withMerger(op string, fn func(Merger) error) error {
	merger, ok := m.method.(Merger)
	if !ok {
		return fmt.Errorf("peft: method %s cannot be merged into the base weights", m.methodName())
	}
	m.state.Lock()
	defer m.state.Unlock()
	defer m.resetExecutors()
	m.mu.Lock()
	m.graphVersion++
	m.mu.Unlock()
	return catch("peft.Model."+op, func() error { return fn(merger) })
}

// Merged reports whether the method's update is currently merged into the base weights. It
// waits for a Merge or Unmerge under way.
func (m *Model) Merged() bool {
	m.state.RLock()
	defer m.state.RUnlock()
	return m.isMerged()
}

// isMerged is Merged for callers that hold the state lock.
func (m *Model) isMerged() bool {
	merger, ok := m.method.(Merger)
	return ok && merger.Merged()
}

// WithExclusive runs fn while the model is used by nothing else: no call, save, load, merge or
// training runs meanwhile. Code that reads or writes the model's variables through its context
// uses it, such as an export (llama.SaveHF of m.Context()) while other goroutines serve calls.
// fn must not call the model's own methods, which would wait for it.
func (m *Model) WithExclusive(fn func() error) error {
	m.state.Lock()
	defer m.state.Unlock()
	return fn()
}

func (m *Model) methodName() string {
	if m.method == nil {
		return "none"
	}
	return m.method.Name()
}

// TrainableVariables lists what the method trains.
func (m *Model) TrainableVariables() []TrainableVariable {
	if m.method == nil {
		return nil
	}
	return m.method.Trainable(m.ctx)
}

// BaseReplacer is implemented by methods that replace some base weights with a frozen form of
// their own (QLoRA's 4-bit weights, which replace float variables).
type BaseReplacer interface {
	// ReplacedBase lists the variables holding the replaced weights: the base fingerprint covers
	// them in place of the weights they replaced.
	ReplacedBase() []*context.Variable
	// BaseParams is the number of base parameters they stand for, which Report counts.
	BaseParams() int64
}

// Report counts the trainable and all parameters of the model with the method applied.
// All parameters are the base model's variables that still exist, the base parameters the method
// holds in another form (BaseReplacer) and the method's trainable ones; optimizer and trainer
// bookkeeping never count.
func (m *Model) Report() ParamReport {
	var r ParamReport
	if counter, ok := m.method.(BaseReplacer); ok {
		r.All += counter.BaseParams()
	}
	counted := map[*context.Variable]bool{}
	for _, tv := range m.TrainableVariables() {
		n := int64(tv.Variable.Shape().Size())
		r.Trainable += n
		r.All += n
		counted[tv.Variable] = true
	}
	for _, v := range m.layout.BaseVariables {
		if counted[v] || m.ctx.GetVariableByScopeAndName(v.Scope(), v.Name()) != v {
			continue
		}
		r.All += int64(v.Shape().Size())
	}
	return r
}

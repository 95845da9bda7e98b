package main

import (
	"context"
	"fmt"
	"io/fs"

	"github.com/gomlx/gomlx/pkg/core/shapes"
	gomlxcontext "github.com/gomlx/gomlx/pkg/ml/context"
	"github.com/gomlx/gopjrt/dtypes"

	"peft/peft"
	"peft/peft/backend"
	"peft/peft/generate"
	"peft/peft/llama"
	"peft/peft/methods"
)

// engine runs generations. The scheduler is its only caller, from one goroutine, so an
// implementation needs no locking of its own. It is the seam where a batched engine (named
// adapters in slots of one model, mixed-adapter batches in one graph, a KV cache) replaces
// serialEngine without the HTTP layer changing.
type engine interface {
	// models lists the names a request may give: the base model's first, then the adapters'.
	models() []string
	// maxLength is the longest sequence (prompt plus new ids) the named model runs on; 0: no limit.
	maxLength(model string) int
	// maxBatch is the most requests one generate call takes (1: one at a time).
	maxBatch() int
	// generate runs every request of reqs (at most maxBatch, of any models) to its end, calling
	// emit(row, id) for each new id of reqs[row] in order; emit returning false ends that row
	// (a stop string was found, the client went away). A row also ends after MaxNewTokens ids
	// or one of its StopIDs (included). It returns one error per row, nil for a row that ended
	// normally.
	generate(reqs []request, emit func(row, id int) bool) []error
}

// request is one generation: token ids in, configuration as generate.Config has it.
type request struct {
	// ctx ends the generation early when done (the client went away, the deadline passed).
	ctx context.Context
	// model is one of engine.models().
	model string
	// prompt is the token ids to continue, BOS included where the model wants one.
	prompt []int
	// cfg is the generation's configuration: MaxNewTokens, sampling, StopIDs.
	cfg generate.Config
}

// adapterSpec names an adapter folder: -adapter name=DIR.
type adapterSpec struct {
	name, dir string
}

// serialEngine is today's engine: one peft.Model per served name (the base alone, and the base
// with each adapter applied by methods.Apply, each on its own context loaded with the base's
// weights), one request at a time, each with generate.Generate. It costs the base's weights
// once per adapter, which is nothing for the small models of this SDK.
//
// Each request is one generate.Generate call (with its key/value cache), whose OnToken streams
// every id as it is made: the ids, sampled ones included, are those examples/generate gives.
type serialEngine struct {
	names  []string
	byName map[string]*peft.Model
}

// loadEngine loads the base model from fsys (a Hugging Face folder of any family peft/llama
// reads, named baseName in requests and recorded as basePath in the contexts, as
// examples/generate does) and each adapter on its own copy of it. It returns the base's
// configuration too.
func loadEngine(fsys fs.FS, baseName, basePath string, adapters []adapterSpec) (*serialEngine, llama.Config, error) {
	b, err := backend.Get()
	if err != nil {
		return nil, llama.Config{}, err
	}
	example := []shapes.Shape{shapes.Make(dtypes.Int32, 1, 1)}
	load := func() (*gomlxcontext.Context, llama.Config, error) {
		ctx := gomlxcontext.New()
		cfg, err := llama.LoadPretrainedFS(ctx, fsys)
		if err != nil {
			return nil, cfg, fmt.Errorf("model %s: %w", basePath, err)
		}
		peft.NameBaseModel(ctx, basePath)
		return ctx, cfg, nil
	}
	e := &serialEngine{byName: map[string]*peft.Model{}}
	ctx, cfg, err := load()
	if err != nil {
		return nil, cfg, err
	}
	base, err := peft.NewModel(b, ctx, llama.CausalLM(cfg), nil, example...)
	if err != nil {
		return nil, cfg, err
	}
	e.names, e.byName[baseName] = []string{baseName}, base
	for _, a := range adapters {
		if _, dup := e.byName[a.name]; dup {
			return nil, cfg, fmt.Errorf("-adapter %s=%s: the name %q is already served", a.name, a.dir, a.name)
		}
		ctx, adapterCfg, err := load()
		if err != nil {
			return nil, cfg, err
		}
		m, err := methods.Apply(b, ctx, llama.CausalLM(adapterCfg), a.dir, example)
		if err != nil {
			return nil, cfg, fmt.Errorf("-adapter %s=%s: %w", a.name, a.dir, err)
		}
		e.names, e.byName[a.name] = append(e.names, a.name), m
	}
	return e, cfg, nil
}

func (e *serialEngine) models() []string { return e.names }

func (e *serialEngine) maxBatch() int { return 1 }

// maxLength is what generate.Generate allows: the layout's maximum length less the virtual
// tokens of prompt or prefix tuning.
func (e *serialEngine) maxLength(model string) int {
	m := e.byName[model]
	layout := m.Layout()
	if layout == nil || layout.MaxLength <= 0 {
		return 0
	}
	limit := layout.MaxLength
	if v, ok := m.Method().(interface{ NumVirtualTokens() int }); ok {
		limit -= v.NumVirtualTokens()
	}
	return max(limit, 1)
}

func (e *serialEngine) generate(reqs []request, emit func(row, id int) bool) []error {
	errs := make([]error, len(reqs))
	for row, r := range reqs {
		errs[row] = e.run(r, func(id int) bool { return emit(row, id) })
	}
	return errs
}

// run steps one request to its end.
func (e *serialEngine) run(r request, emit func(id int) bool) error {
	m, found := e.byName[r.model]
	if !found {
		return fmt.Errorf("unknown model %q", r.model)
	}
	cfg := r.cfg
	cfg.OnToken = func(id int) bool { return r.ctx.Err() == nil && emit(id) }
	if _, err := generate.Generate(m, r.prompt, cfg); err != nil {
		return err
	}
	return r.ctx.Err()
}

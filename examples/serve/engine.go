package main

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log"

	"github.com/gomlx/gomlx/pkg/core/shapes"
	"github.com/gomlx/gomlx/pkg/core/tensors"
	gomlxcontext "github.com/gomlx/gomlx/pkg/ml/context"
	"github.com/gomlx/gopjrt/dtypes"

	"peft/lora/combine"
	"peft/lora/multi"
	"peft/peft"
	"peft/peft/backend"
	"peft/peft/generate"
	"peft/peft/llama"
	"peft/peft/methods"
)

// engine runs generations. The scheduler is its only caller, from one goroutine, so an
// implementation needs no locking of its own; batchEngine is the one the server runs, and the
// scheduler's tests run a fake.
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

// batchEngine serves the base model and its LoRA adapters from one lora/multi model, each
// adapter in a slot of its own, so that a batch mixes them in one graph; any other adapter
// (DoRA, IA³, prompt or prefix tuning, LoRA with modules to save, ...) runs on its own copy of the
// base, loaded with methods.Apply. A batch of requests runs as one generate.GenerateBatchVia for
// the rows the multi model serves and one generate.GenerateBatch per other model, each row with
// its own prompt length, options and OnToken streaming its ids as they are made; every row's ids,
// sampled ones included, are those examples/generate gives for the same request.
type batchEngine struct {
	names   []string
	served  *multi.Model           // the base and the LoRA adapters
	inSlots map[string]string      // served name → slot name ("" for the base)
	own     map[string]*peft.Model // the other adapters
	batch   int
}

// loadEngine loads the base model from fsys (a Hugging Face folder of any family peft/llama
// reads, named baseName in requests and recorded as basePath in the contexts, as
// examples/generate does) with a slot for every LoRA adapter, and each other adapter on its own
// copy of the base. It returns the base's configuration too.
func loadEngine(fsys fs.FS, baseName, basePath string, adapters []adapterSpec, maxBatch int) (*batchEngine, llama.Config, error) {
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
	// Slots for the adapters that are plain LoRA, as large as the largest rank.
	slotted := map[string]bool{}
	slots := multi.DefaultConfig()
	slots.Slots, slots.MaxRank = 0, 1
	for _, a := range adapters {
		if f, err := combine.ReadFolder(a.dir); err == nil && len(f.Config.ModulesToSave) == 0 {
			slotted[a.name] = true
			slots.Slots, slots.MaxRank = slots.Slots+1, max(slots.MaxRank, f.Rank)
		}
	}
	slots.Slots = max(slots.Slots, 1)
	ctx, cfg, err := load()
	if err != nil {
		return nil, cfg, err
	}
	served, err := multi.NewModel(b, ctx, llama.CausalLM(cfg), slots, example...)
	if err != nil {
		return nil, cfg, err
	}
	e := &batchEngine{names: []string{baseName}, served: served, inSlots: map[string]string{baseName: ""},
		own: map[string]*peft.Model{}, batch: maxBatch}
	for _, a := range adapters {
		if _, dup := e.inSlots[a.name]; dup || e.own[a.name] != nil {
			return nil, cfg, fmt.Errorf("-adapter %s=%s: the name %q is already served", a.name, a.dir, a.name)
		}
		e.names = append(e.names, a.name)
		if slotted[a.name] {
			err := served.Load(a.name, a.dir)
			if err == nil {
				e.inSlots[a.name] = a.name
				continue
			}
			log.Printf("serve: %s runs on its own copy of the base, not in a slot: %v", a.name, err)
		}
		ctx, adapterCfg, err := load()
		if err != nil {
			return nil, cfg, err
		}
		m, err := methods.Apply(b, ctx, llama.CausalLM(adapterCfg), a.dir, example)
		if err != nil {
			return nil, cfg, fmt.Errorf("-adapter %s=%s: %w", a.name, a.dir, err)
		}
		e.own[a.name] = m
	}
	return e, cfg, nil
}

func (e *batchEngine) models() []string { return e.names }

func (e *batchEngine) maxBatch() int { return e.batch }

// model returns the peft.Model that runs the named model's rows.
func (e *batchEngine) model(name string) *peft.Model {
	if m := e.own[name]; m != nil {
		return m
	}
	return e.served.PEFT()
}

// maxLength is what generate.Generate allows the named model.
func (e *batchEngine) maxLength(model string) int {
	return generate.MaxLength(e.model(model), generate.Config{})
}

// generate runs the rows of the slotted models as one batch, then each other model's rows as a
// batch of their own.
func (e *batchEngine) generate(reqs []request, emit func(row, id int) bool) []error {
	errs := make([]error, len(reqs))
	groups := map[string][]int{} // "" for the slotted rows, else the model's name
	for row, r := range reqs {
		switch _, slotted := e.inSlots[r.model]; {
		case slotted:
			groups[""] = append(groups[""], row)
		case e.own[r.model] != nil:
			groups[r.model] = append(groups[r.model], row)
		default:
			errs[row] = fmt.Errorf("unknown model %q", r.model)
		}
	}
	for group, rows := range groups {
		prompts, cfgs := make([][]int, len(rows)), make([]generate.Config, len(rows))
		slotNames := make([]string, len(rows))
		for j, row := range rows {
			r := reqs[row]
			prompts[j], cfgs[j], slotNames[j] = r.prompt, r.cfg, e.inSlots[r.model]
			cfgs[j].OnToken = func(id int) bool { return r.ctx.Err() == nil && emit(row, id) }
		}
		var err error
		if group == "" {
			call := func(key string, fn peft.ModelFn, inputs ...*tensors.Tensor) ([]*tensors.Tensor, error) {
				return e.served.CallFn(key, fn, slotNames, inputs...)
			}
			_, err = generate.GenerateBatchVia(e.served.PEFT(), call, prompts, cfgs)
		} else {
			_, err = generate.GenerateBatch(e.own[group], prompts, cfgs)
		}
		var batchErr *generate.BatchError
		for j, row := range rows {
			switch {
			case errors.As(err, &batchErr):
				errs[row] = batchErr.Rows[j]
			case err != nil:
				errs[row] = err
			}
			if errs[row] == nil {
				errs[row] = reqs[row].ctx.Err()
			}
		}
	}
	return errs
}

package generate_test

import (
	"fmt"
	"slices"

	"github.com/gomlx/gomlx/pkg/core/shapes"
	"github.com/gomlx/gomlx/pkg/ml/context"
	"github.com/gomlx/gopjrt/dtypes"

	"peft/peft"
	"peft/peft/backend"
	"peft/peft/generate"
	"peft/peft/llama"
)

// Greedy decoding, a stop id and seeded sampling with a small (untrained) Llama language model.
// A fine-tuned model (LoRA, adapters, prompt tuning) generates the same way.
func Example() {
	b, err := backend.Get()
	if err != nil {
		panic(err)
	}
	cfg := llama.Tiny()
	ctx := context.New()
	if err := llama.Init(ctx, cfg, 0, 1); err != nil { // a language model: numLabels 0
		panic(err)
	}
	m, err := peft.NewModel(b, ctx, llama.CausalLM(cfg), nil, shapes.Make(dtypes.Int32, 1, 16))
	if err != nil {
		panic(err)
	}
	prompt := []int{1, 11, 13, 15} // token ids, BOS first

	greedy, err := generate.Generate(m, prompt, generate.Config{MaxNewTokens: 8})
	if err != nil {
		panic(err)
	}
	fmt.Println("greedy:", greedy)

	// Without the key/value cache every step recomputes the whole buffer: slower, the same ids.
	slow, err := generate.Generate(m, prompt, generate.Config{MaxNewTokens: 8, NoCache: true})
	if err != nil {
		panic(err)
	}
	fmt.Println("without the cache, same ids:", slices.Equal(greedy, slow))

	// Generation stops right after a stop id (an EOS id, say), which is included.
	stopped, err := generate.Generate(m, prompt, generate.Config{MaxNewTokens: 8, StopIDs: []int{29}})
	if err != nil {
		panic(err)
	}
	fmt.Println("stop at 29:", stopped)

	// Sampling: the same seed gives the same ids.
	sample := generate.Config{MaxNewTokens: 8, Temperature: 0.8, TopK: 20, TopP: 0.95, Seed: 42}
	first, err := generate.Generate(m, prompt, sample)
	if err != nil {
		panic(err)
	}
	again, err := generate.Generate(m, prompt, sample)
	if err != nil {
		panic(err)
	}
	fmt.Println("sampled", len(first), "ids; same seed, same ids:", slices.Equal(first, again))
	// Output:
	// greedy: [28 61 29 37 49 54 27 59]
	// without the cache, same ids: true
	// stop at 29: [28 61 29]
	// sampled 8 ids; same seed, same ids: true
}

// Several prompts of different lengths in one batch, each with its own configuration: each row
// gets the ids Generate gives it alone.
func ExampleGenerateBatch() {
	b, err := backend.Get()
	if err != nil {
		panic(err)
	}
	cfg := llama.Tiny()
	ctx := context.New()
	if err := llama.Init(ctx, cfg, 0, 1); err != nil {
		panic(err)
	}
	m, err := peft.NewModel(b, ctx, llama.CausalLM(cfg), nil, shapes.Make(dtypes.Int32, 1, 16))
	if err != nil {
		panic(err)
	}
	prompts := [][]int{{1, 11, 13, 15}, {1}, {1, 5, 63, 8, 12, 19}}
	cfgs := []generate.Config{
		{MaxNewTokens: 8},                                       // greedy
		{MaxNewTokens: 4, StopIDs: []int{29}},                   // greedy, ends early at a stop id or after 4
		{MaxNewTokens: 6, Temperature: 0.8, TopK: 20, Seed: 42}, // sampled from its own seed
	}
	rows, err := generate.GenerateBatch(m, prompts, cfgs)
	if err != nil {
		panic(err) // a *generate.BatchError when some rows failed: one error per row
	}
	for i, ids := range rows {
		alone, err := generate.Generate(m, prompts[i], cfgs[i])
		if err != nil {
			panic(err)
		}
		fmt.Printf("row %d: %d ids, as alone: %v\n", i, len(ids), slices.Equal(ids, alone))
	}
	fmt.Println("row 0:", rows[0])
	// Output:
	// row 0: 8 ids, as alone: true
	// row 1: 4 ids, as alone: true
	// row 2: 6 ids, as alone: true
	// row 0: [28 61 29 37 49 54 27 59]
}

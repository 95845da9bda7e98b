package adalora_test

import (
	"fmt"
	"math"
	"os"
	"path/filepath"

	"github.com/gomlx/gomlx/pkg/core/shapes"
	"github.com/gomlx/gomlx/pkg/ml/context"
	"github.com/gomlx/gopjrt/dtypes"

	"peft/lora/adalora"
	"peft/peft"
	"peft/peft/backend"
	"peft/peft/llama"
	"peft/peft/reviews"
)

// The whole AdaLoRA workflow on a small Llama classifier: apply, train through the budget
// schedule (the rank shrinks from 12 to an average of 8 per matrix), read the rank pattern, save
// and merge.
func Example() {
	b, err := backend.Get()
	if err != nil {
		panic(err)
	}
	tok := reviews.NewTokenizer()
	cfg := llama.Tiny()
	cfg.VocabSize = tok.VocabSize()
	ctx := context.New()
	if err := llama.Init(ctx, cfg, 2, 1); err != nil { // a base model with a 2-class "score" head
		panic(err)
	}

	// AdaLoRA on q_proj and v_proj (the defaults), r 12 → 8, over 80 steps: 10 of warm-up, then the
	// cubic budget schedule, and the last 20 with the final rank pattern frozen.
	const steps = 80
	acfg := adalora.DefaultConfig()
	acfg.TotalSteps, acfg.TInit, acfg.TFinal = steps, 10, 20
	acfg.ModulesToSave = []string{"score"}
	method, err := adalora.New(acfg)
	if err != nil {
		panic(err)
	}
	final := 0
	method.OnRankPatternChange(func(e adalora.RankEvent) {
		if e.Final { // every change could be logged: fmt.Println(e)
			final = e.Budget
		}
	})
	example := shapes.Make(dtypes.Int32, 16, 8)
	m, err := peft.NewModel(b, ctx, llama.Classifier(cfg, 2), method, example, example)
	if err != nil {
		panic(err)
	}
	// 4 matrices × 12·(in + out + 1), plus the head's 32·2.
	fmt.Println(m.Report())

	batches, err := reviews.Batches(tok, reviews.Generate(256, 1), 16, 8)
	if err != nil {
		panic(err)
	}
	trainer, err := peft.NewTrainer(m, peft.TrainConfig{
		Steps: steps, LearningRate: 3e-2, Loss: peft.CrossEntropy, Progress: peft.ProgressOff,
	})
	if err != nil {
		panic(err)
	}
	losses, err := trainer.Train(peft.NewDataset("reviews", batches, true))
	if err != nil {
		panic(err)
	}
	mean := func(xs []float64) float64 {
		var sum float64
		for _, x := range xs {
			sum += x
		}
		return sum / float64(len(xs))
	}
	fmt.Println("loss went down:", mean(losses[len(losses)-10:]) < mean(losses[:10]))

	// The rank pattern: how many of its 12 singular values each matrix kept.
	kept := 0
	for _, r := range method.RankPattern() {
		kept += r
	}
	fmt.Printf("singular values kept: %d of %d (final allocation: %d)\n", kept, 4*12, final)

	// Save writes the adapter with its masks: a model built with the same config and loaded
	// from dir has the same rank pattern.
	dir, _ := os.MkdirTemp("", "adalora-example")
	defer os.RemoveAll(dir)
	if err := m.Save(filepath.Join(dir, "adapter")); err != nil {
		panic(err)
	}

	// Merge folds s·P·diag(Λ)·Q into the base weights: same outputs, no extra cost.
	before, _ := m.Call(batches[0].Inputs...)
	if err := m.Merge(); err != nil {
		panic(err)
	}
	after, _ := m.Call(batches[0].Inputs...)
	maxDiff := 0.0
	x, y := before[0].Value().([][]float32), after[0].Value().([][]float32)
	for i := range x {
		for j := range x[i] {
			maxDiff = math.Max(maxDiff, math.Abs(float64(x[i][j]-y[i][j])))
		}
	}
	fmt.Println("merged outputs agree within 1e-5:", maxDiff < 1e-5)
	// Output:
	// trainable params: 2,800 || all params: 23,440 || trainable%: 11.9454
	// loss went down: true
	// singular values kept: 32 of 48 (final allocation: 32)
	// merged outputs agree within 1e-5: true
}

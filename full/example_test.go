package full_test

import (
	"fmt"

	"github.com/gomlx/gomlx/pkg/core/shapes"
	"github.com/gomlx/gomlx/pkg/ml/context"
	"github.com/gomlx/gopjrt/dtypes"

	"peft/full"
	"peft/peft"
	"peft/peft/backend"
	"peft/peft/llama"
)

// Full fine-tuning of a 3-block tiny Llama classifier with layer-wise learning-rate decay 0.5,
// the lowest layer frozen (freeze_layers 1: the embeddings and block 0) and L2-SP toward the
// pretrained weights. It prints the parameter report and, per depth, the learning-rate
// multiplier and the number of parameters.
func Example() {
	cfg := full.DefaultConfig()
	cfg.LayerDecay = 0.5
	cfg.FreezeLayers = 1
	cfg.L2SP = 1e-3
	method, err := full.New(cfg)
	if err != nil {
		panic(err)
	}

	b, err := backend.Get()
	if err != nil {
		panic(err)
	}
	ctx := context.New()
	model := llama.Tiny()
	model.NumLayers = 3
	if err := llama.Init(ctx, model, 2, 1); err != nil {
		panic(err)
	}
	m, err := peft.NewModel(b, ctx, llama.Classifier(model, 2), method, shapes.Make(dtypes.Int32, 1, 8))
	if err != nil {
		panic(err)
	}
	fmt.Println(m.Report())

	rates := map[*context.Variable]float64{}
	for _, tv := range m.TrainableVariables() {
		rates[tv.Variable] = tv.LRScale
	}
	params := map[int]int{}
	rate := map[int]string{}
	for _, v := range m.Layout().BaseVariables {
		d := method.Depth(v)
		params[d] += v.Shape().Size()
		if scale, trained := rates[v]; trained {
			rate[d] = fmt.Sprintf("lr×%g", scale)
		} else {
			rate[d] = "frozen"
		}
	}
	for d := 0; d <= m.Layout().NumLayers; d++ {
		fmt.Printf("depth %d: %-7s %6s params\n", d, rate[d], peft.Thousands(int64(params[d])))
	}
	// Then train with peft.NewTrainer(m, peft.TrainConfig{…}); plain weight decay is
	// TrainConfig.WeightDecay (AdamW's, decoupled), and m.Save writes the whole model.

	// Output:
	// trainable params: 18,656 || all params: 29,984 || trainable%: 62.2199
	// depth 0: frozen   2,048 params
	// depth 1: frozen   9,280 params
	// depth 2: lr×0.5   9,280 params
	// depth 3: lr×1     9,376 params
}

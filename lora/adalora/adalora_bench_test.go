package adalora_test

// AdaLoRA against LoRA at the same final budget on the real pretrained stories260K (hidden 64,
// 5 layers, 35 linear layers besides the tied head): LoRA r = 8 on every linear layer but the
// head, and AdaLoRA from r = 12 down to an average of 8 on the same layers, so both end with
// 8·35 = 280 rank-one components. Both train with AdamW at the same learning rate on the same
// text: short stories in a style TinyStories never had (invented creatures, names and places;
// storyText), next-token loss on rows of benchSeq tokens.
//
//	go test -run '^$' -bench 'AdaLoRA' -benchtime 20x ./lora/adalora/
//
// BenchmarkAdaLoRATrainStep times one train step of each method (median ms/step, and the ratio),
// AdaLoRA's allocator included (importance update and masking every step: the budgeting phase
// with ΔT = 1, AdaLoRA's most expensive).
// BenchmarkAdaLoRAAllocator times the allocator alone (AfterStep in the budgeting phase: the
// importance update, the selection on the host and the masking).
//
//	go test -run '^$' -bench 'AdaLoRAQuality' -benchtime 1x ./lora/adalora/
//
// BenchmarkAdaLoRAQuality trains each method benchQualitySteps steps and reports the held-out
// loss (eval_nll), the trainable share at the start and the share the rank pattern keeps at the
// end (trainable_%_start, kept_%_end), and prints AdaLoRA's final rank pattern per layer and
// matrix next to LoRA's uniform 8. Each b.N round trains afresh: run it with -benchtime 1x.

import (
	"fmt"
	"io/fs"
	"os"
	"slices"
	"strings"
	"testing"
	"text/tabwriter"
	"time"

	"github.com/gomlx/gomlx/pkg/core/tensors"
	"github.com/stretchr/testify/require"

	"peft/lora"
	"peft/lora/adalora"
	"peft/peft"
	"peft/peft/stories260k"
	"peft/peft/tokenizer"
)

const (
	benchBatch        = 4
	benchSeq          = 64
	benchLR           = 1e-2
	benchQualitySteps = 150
)

// benchMethod is one side of the comparison; total is the number of steps it will train (AdaLoRA's
// schedule spans it).
type benchMethod struct {
	name string
	new  func(total int) (peft.Method, error)
}

var benchMethods = []benchMethod{
	{"lora-r8", func(int) (peft.Method, error) {
		cfg := lora.DefaultConfig()
		cfg.TargetModules = peft.TargetPattern(peft.AllLinear)
		return lora.New(cfg)
	}},
	{"adalora-r12to8", func(total int) (peft.Method, error) {
		cfg := adalora.DefaultConfig()
		cfg.TargetModules = peft.TargetPattern(peft.AllLinear)
		cfg.TotalSteps = total
		cfg.TInit, cfg.TFinal = total/10, total/5 // HF's examples warm up and finish with a frozen pattern
		return adalora.New(cfg)
	}},
}

// storyText returns n short stories from a fixed template over invented words, drawn from seed.
func storyText(n int, seed uint64) []string {
	rng := peft.NewRand(seed)
	pick := func(words ...string) string { return words[rng.IntN(len(words))] }
	out := make([]string, n)
	for i := range out {
		name := pick("Quix", "Bopo", "Zindle", "Murf", "Tazzle", "Plink")
		friend := pick("Orbo", "Yeeb", "Fonzel", "Grib")
		thing := pick("moonpebble", "snozzcake", "twinklenut", "blorpkin")
		place := pick("the glimmerwood", "the Fizzle Marsh", "Mount Plonk")
		out[i] = fmt.Sprintf("Once upon a time, a %s named %s lived in %s. Every %s, %s would %s the %s %s. "+
			"One day, %s met %s. \"Shall we %s the %s together?\" said %s. And they did, all day long.",
			pick("zorblat", "snerfling", "quibbit", "wumple"), name, place, pick("morning", "moonrise"), name,
			pick("flonk", "zib", "glimp"), pick("fizzy", "squishy", "zany"), thing, name, friend,
			pick("flonk", "zib", "glimp"), thing, friend)
	}
	return out
}

// lmBatches tokenizes texts (<s> text </s>) into one stream cut into [benchBatch, benchSeq] rows.
func lmBatches(tb testing.TB, tok *tokenizer.Tokenizer, texts []string) []peft.Batch {
	tb.Helper()
	var stream []int32
	for _, text := range texts {
		for _, id := range tok.Encode(text) {
			stream = append(stream, int32(id))
		}
		stream = append(stream, int32(tok.EOS()))
	}
	per := benchBatch * benchSeq
	var out []peft.Batch
	for start := 0; start+per <= len(stream); start += per {
		ids := tensors.FromFlatDataAndDimensions(append([]int32(nil), stream[start:start+per]...), benchBatch, benchSeq)
		out = append(out, peft.Batch{Inputs: []*tensors.Tensor{ids}, Labels: []*tensors.Tensor{ids}})
	}
	require.NotEmpty(tb, out)
	return out
}

func storiesTokenizer(tb testing.TB) *tokenizer.Tokenizer {
	tb.Helper()
	data, err := fs.ReadFile(stories260k.FS(), "tokenizer.json")
	require.NoError(tb, err)
	tok, err := tokenizer.Parse(data)
	require.NoError(tb, err)
	return tok
}

// newBenchTrainer builds stories260K with the method and a trainer for total steps.
func newBenchTrainer(tb testing.TB, bm benchMethod, total int) (*peft.Model, *peft.Trainer) {
	tb.Helper()
	method, err := bm.new(total)
	require.NoError(tb, err)
	m := loadStories(tb, method, benchSeq)
	trainer, err := peft.NewTrainer(m, peft.TrainConfig{Steps: total, LearningRate: benchLR, Loss: peft.NextTokenLoss, Progress: peft.ProgressOff})
	require.NoError(tb, err)
	return m, trainer
}

func BenchmarkAdaLoRATrainStep(b *testing.B) {
	tok := storiesTokenizer(b)
	train := peft.NewDataset("stories", lmBatches(b, tok, storyText(200, 1)), true)
	// Both trainers live side by side and take turns, step by step, so that neither pays for
	// running first (the first model trained in a process is measurably slower here).
	trainers := make([]*peft.Trainer, len(benchMethods))
	for i, bm := range benchMethods {
		// A schedule long enough that every timed step is in the budgeting phase.
		_, trainers[i] = newBenchTrainer(b, bm, 1_000_000)
		_, err := trainers[i].TrainSteps(train, 3) // compiles the graphs
		require.NoError(b, err)
	}
	durations := make([][]time.Duration, len(trainers))
	b.ResetTimer()
	for range b.N {
		for i, trainer := range trainers {
			start := time.Now()
			if _, err := trainer.TrainSteps(train, 1); err != nil {
				b.Fatal(err)
			}
			durations[i] = append(durations[i], time.Since(start))
		}
	}
	b.StopTimer()
	medians := make([]float64, len(trainers))
	for i, d := range durations {
		slices.Sort(d)
		medians[i] = float64(d[len(d)/2].Microseconds()) / 1000
		b.ReportMetric(medians[i], benchMethods[i].name+"_ms/step")
	}
	b.ReportMetric(medians[1]/medians[0], "adalora/lora")
}

func BenchmarkAdaLoRAAllocator(b *testing.B) {
	tok := storiesTokenizer(b)
	train := peft.NewDataset("stories", lmBatches(b, tok, storyText(200, 1)), true)
	m, trainer := newBenchTrainer(b, benchMethods[1], 1_000_000)
	_, err := trainer.TrainSteps(train, 2) // compiles the train graph and the allocator's
	require.NoError(b, err)
	a := m.Method().(*adalora.AdaLoRA)
	b.ResetTimer()
	for i := range b.N {
		if err := a.AfterStep(m.Context(), 3+i); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkAdaLoRAQuality(b *testing.B) {
	tok := storiesTokenizer(b)
	train := peft.NewDataset("stories", lmBatches(b, tok, storyText(400, 1)), true)
	eval := peft.NewDataset("held-out", lmBatches(b, tok, storyText(60, 2)), false)
	results := map[string]string{}
	var pattern map[string]int
	for _, bm := range benchMethods {
		b.Run(bm.name, func(b *testing.B) {
			for range b.N {
				m, trainer := newBenchTrainer(b, bm, benchQualitySteps)
				before, err := trainer.Evaluate(eval)
				require.NoError(b, err)
				report := m.Report()
				base := report.All - report.Trainable
				startShare := report.Percent()
				keptShare := startShare
				_, err = trainer.Train(train)
				require.NoError(b, err)
				after, err := trainer.Evaluate(eval)
				require.NoError(b, err)
				if a, ok := m.Method().(*adalora.AdaLoRA); ok {
					kept := a.EffectiveParams()
					keptShare = 100 * float64(kept) / float64(base+kept)
					pattern = a.RankPattern()
				}
				b.ReportMetric(after.Loss, "eval_nll")
				b.ReportMetric(startShare, "trainable_%_start")
				b.ReportMetric(keptShare, "kept_%_end")
				results[bm.name] = fmt.Sprintf("%s: held-out NLL %.4f → %.4f; trainable %s of %s (%.3f%%) at the start, %.3f%% kept at the end; median step %v",
					bm.name, before.Loss, after.Loss, peft.Thousands(report.Trainable), peft.Thousands(report.All), startShare, keptShare,
					trainer.MedianStepTime())
			}
		})
	}
	for _, bm := range benchMethods {
		if r, ok := results[bm.name]; ok {
			fmt.Println(r)
		}
	}
	if pattern != nil {
		printPattern(pattern)
	}
}

// printPattern prints a rank pattern as a table: one row per layer, one column per matrix.
func printPattern(pattern map[string]int) {
	mats := []string{"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
	w := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
	header := []string{"AdaLoRA rank (LoRA: 8 everywhere)"}
	for _, mat := range mats {
		header = append(header, mat[strings.Index(mat, ".")+1:])
	}
	fmt.Fprintln(w, strings.Join(header, "\t")+"\tsum\t")
	total := 0
	for layer := 0; ; layer++ {
		if _, ok := pattern[fmt.Sprintf("model.layers.%d.%s", layer, mats[0])]; !ok {
			break
		}
		row := []string{fmt.Sprintf("layer %d", layer)}
		sum := 0
		for _, mat := range mats {
			r := pattern[fmt.Sprintf("model.layers.%d.%s", layer, mat)]
			sum += r
			row = append(row, fmt.Sprint(r))
		}
		total += sum
		fmt.Fprintln(w, strings.Join(row, "\t")+fmt.Sprintf("\t%d\t", sum))
	}
	fmt.Fprintf(w, "total\t\t\t\t\t\t\t\t%d\t\n", total)
	_ = w.Flush()
}

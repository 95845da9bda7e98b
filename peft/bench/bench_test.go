// Package bench compares the fine-tuning methods on the same pretrained model and data with
// go test -bench: train-step time, inference time (LoRA merged and unmerged), trainable share,
// bytes of trainable parameters plus optimizer state, and held-out accuracy after a fixed step
// budget (measured once per method, outside the timed loop).
//
//	go test -run '^$' -bench . -benchtime 20x ./peft/bench/
//
// Compare ratios measured in one run: these machines are noisy.
package bench

import (
	"sync"
	"testing"

	"github.com/stretchr/testify/require"

	"peft/full"
	"peft/peft"
	"peft/peft/backend"
	"peft/peft/experiment"
)

// qualitySteps is the fixed step budget after which BenchmarkTrainStep reports each method's
// held-out accuracy and loss.
const qualitySteps = 100

var (
	setupOnce sync.Once
	setup     *experiment.Setup
	setupErr  error

	// quality caches each method's fixed-budget fine-tuning result: it runs once per process,
	// outside the timed loop, however often the benchmark function is called.
	quality = map[string]*experiment.Result{}
)

func getSetup(b *testing.B) *experiment.Setup {
	b.Helper()
	setupOnce.Do(func() {
		bk, err := backend.Get()
		if err != nil {
			setupErr = err
			return
		}
		b.Log(backend.Description())
		opts := experiment.DefaultOptions()
		// Larger than the example's model, so that matmuls rather than per-op overhead dominate.
		opts.Config.HiddenSize, opts.Config.IntermediateSize, opts.Config.NumLayers = 128, 344, 4
		opts.Config.NumHeads, opts.Config.NumKVHeads = 4, 4
		opts.PretrainSteps = 50
		pretrain, err := full.New(full.DefaultConfig())
		if err != nil {
			setupErr = err
			return
		}
		setup, setupErr = experiment.NewSetup(bk, opts, pretrain)
	})
	require.NoError(b, setupErr)
	return setup
}

// BenchmarkTrainStep times one training step (forward, loss, backward, AdamW) per method and
// reports its trainable share, the bytes of trainable parameters plus optimizer state, tokens/s,
// and the held-out accuracy and loss after qualitySteps of fine-tuning.
func BenchmarkTrainStep(b *testing.B) {
	s := getSetup(b)
	for _, c := range experiment.Candidates() {
		b.Run(c.Name, func(b *testing.B) {
			q := quality[c.Name]
			if q == nil {
				method, err := c.New(qualitySteps)
				require.NoError(b, err)
				q, err = s.FineTune(c.Name, method, qualitySteps, c.LearningRate, peft.ProgressOff, nil)
				require.NoError(b, err)
				quality[c.Name] = q
			}
			method, err := c.New(qualitySteps)
			require.NoError(b, err)
			m, err := s.NewClassifier(method)
			require.NoError(b, err)
			trainer, err := peft.NewTrainer(m, peft.TrainConfig{Steps: 1 << 30, LearningRate: c.LearningRate,
				Decay: peft.ConstantDecay, Loss: peft.CrossEntropy, Progress: peft.ProgressOff})
			require.NoError(b, err)
			ds := peft.NewDataset("train", s.Train, true)
			_, err = trainer.TrainSteps(ds, 2) // compile
			require.NoError(b, err)
			b.ResetTimer()
			_, err = trainer.TrainSteps(ds, b.N)
			require.NoError(b, err)
			b.StopTimer()
			report := m.Report()
			var bytes int64
			for _, tv := range m.TrainableVariables() {
				bytes += int64(tv.Variable.Shape().Memory())
			}
			bytes += peft.OptimizerStateBytes(m.Context())
			b.ReportMetric(report.Percent(), "trainable%")
			b.ReportMetric(float64(report.Trainable), "trainable_params")
			b.ReportMetric(float64(bytes), "train_state_bytes")
			b.ReportMetric(float64(s.Batch*s.SeqLen)*float64(b.N)/b.Elapsed().Seconds(), "tokens/s")
			b.ReportMetric(q.Accuracy, "accuracy")
			b.ReportMetric(q.FinalLoss, "eval_loss")
		})
	}
}

// BenchmarkInference times one forward pass of a batch: the base model, LoRA unmerged and
// merged, and the methods that cannot merge.
func BenchmarkInference(b *testing.B) {
	s := getSetup(b)
	cases := []struct {
		name  string
		cand  string
		merge bool
	}{
		{"base", "", false},
		{"lora-unmerged", "lora-all-linear", false},
		{"lora-merged", "lora-all-linear", true},
		{"dora-unmerged", "dora", false},
		{"ia3-unmerged", "ia3", false},
		{"adapter-pfeiffer", "adapter-pfeiffer", false},
		{"adapter-houlsby", "adapter-houlsby", false},
		{"prompt-tuning", "prompt-tuning", false},
		{"prefix-tuning", "prefix-tuning", false},
	}
	for _, tc := range cases {
		b.Run(tc.name, func(b *testing.B) {
			var err error
			var method peft.Method
			for _, c := range experiment.Candidates() {
				if c.Name == tc.cand {
					method, err = c.New(qualitySteps)
					require.NoError(b, err)
				}
			}
			m, err := s.NewClassifier(method)
			require.NoError(b, err)
			if tc.merge {
				require.NoError(b, m.Merge())
			}
			inputs := s.Eval[0].Inputs
			_, err = m.Call(inputs...) // compile
			require.NoError(b, err)
			b.ResetTimer()
			for range b.N {
				out, err := m.Call(inputs...)
				if err != nil {
					b.Fatal(err)
				}
				out[0].FinalizeAll()
			}
		})
	}
}

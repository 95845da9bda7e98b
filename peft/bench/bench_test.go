// Package bench compares the fine-tuning methods on the same pretrained model and data with
// go test -bench: train-step time, inference time (LoRA merged and unmerged), trainable share,
// bytes of trainable parameters plus optimizer state, and held-out accuracy after a fixed step
// budget.
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

// qualitySteps is the fixed step budget of BenchmarkQuality.
const qualitySteps = 100

var (
	setupOnce sync.Once
	setup     *experiment.Setup
	setupErr  error
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
		{"adapter-pfeiffer", "adapter-pfeiffer", false},
		{"adapter-houlsby", "adapter-houlsby", false},
		{"prompt-tuning", "prompt-tuning", false},
	}
	for _, tc := range cases {
		b.Run(tc.name, func(b *testing.B) {
			var err error
			var method peft.Method
			for _, c := range experiment.Candidates() {
				if c.Name == tc.cand {
					method, err = c.New()
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

// BenchmarkQuality fine-tunes each method for a fixed step budget and reports held-out accuracy
// and loss. Each iteration is a whole fine-tuning run: use -benchtime 1x.
func BenchmarkQuality(b *testing.B) {
	s := getSetup(b)
	for _, c := range experiment.Candidates() {
		b.Run(c.Name, func(b *testing.B) {
			var r *experiment.Result
			for range b.N {
				method, err := c.New()
				require.NoError(b, err)
				r, err = s.FineTune(c.Name, method, qualitySteps, c.LearningRate, peft.ProgressOff, nil)
				require.NoError(b, err)
			}
			b.ReportMetric(r.Accuracy, "accuracy")
			b.ReportMetric(r.FinalLoss, "eval_loss")
			b.ReportMetric(r.Report.Percent(), "trainable%")
		})
	}
}

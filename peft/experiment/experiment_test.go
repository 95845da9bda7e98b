package experiment_test

import (
	"bytes"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"peft/full"
	"peft/peft"
	"peft/peft/backend"
	"peft/peft/experiment"
)

// The example's path end to end on a small budget: pretraining lowers the next-token loss, every
// candidate fine-tunes and evaluates, and the table lists them all.
func TestCandidatesRunEndToEnd(t *testing.T) {
	b, err := backend.Get()
	require.NoError(t, err)
	opts := experiment.DefaultOptions()
	opts.TrainReviews, opts.EvalReviews, opts.PretrainSteps = 256, 64, 20
	pretrain, err := full.New(full.DefaultConfig())
	require.NoError(t, err)
	setup, err := experiment.NewSetup(b, opts, pretrain)
	require.NoError(t, err)
	require.Len(t, setup.PretrainLosses, 20)
	require.Less(t, setup.PretrainLosses[19], setup.PretrainLosses[0])

	var results []*experiment.Result
	for _, c := range experiment.Candidates() {
		method, err := c.New(5)
		require.NoError(t, err)
		r, err := setup.FineTune(c.Name, method, 5, c.LearningRate, peft.ProgressOff, nil)
		require.NoError(t, err, c.Name)
		require.Len(t, r.Losses, 5)
		require.Greater(t, r.Report.Trainable, int64(0))
		require.Greater(t, r.TrainableBytes, 3*4*r.Report.Trainable-1, "parameters plus two Adam moments, float32")
		require.False(t, r.Accuracy < 0 || r.Accuracy > 1)
		results = append(results, r)
	}
	var table bytes.Buffer
	require.NoError(t, experiment.WriteTable(&table, results))
	lines := strings.Split(strings.TrimSpace(table.String()), "\n")
	require.Len(t, lines, len(results)+1)
	require.Contains(t, lines[0], "trainable %")
	require.Contains(t, lines[1], "full")
	require.Contains(t, lines[1], "100.000")
}

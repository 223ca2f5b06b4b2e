from PIL import Image

from medflow.engine.logs import read_log
from medflow.report.curves import plot_training_curves


def test_curves_from_a_log_with_odd_class_names(tmp_path):
    log = tmp_path / "log.csv"
    log.write_text(
        "step,lr,loss,flow_loss,seg_loss,val_dice,val_dice_$x$,val_dice_dice,seconds\n"
        "1,0.001,1.0,0.5,0.5,,,,1.0\n"
        "2,0.001,0.8,0.4,0.4,0.6,0.5,0.7,2.0\n"
    )
    rows = read_log(log)
    assert rows[1]["val_dice_dice"] == 0.7 and rows[1]["val_dice"] == 0.6  # no column clash
    out = plot_training_curves(log, tmp_path / "curves.png")
    with Image.open(out) as im:
        assert im.size[0] > 500 and im.size[1] > 200
